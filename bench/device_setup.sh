#!/usr/bin/env bash
# Set up a bare GPU machine with no network for the kit's GPU benchmarks, in one line.
#
# Here (a machine with the kit's .venv, LIBERO and network), once:
#   OFFLINE_BUNDLE=<path of an offline LIBERO packer> bash bench/device_setup.sh pack
#     -> .device/bundle/  LIBERO-Goal's code, assets and init states + wheels, and its setup.sh
#        (the packer: any tool that writes wheels/, site.tar.xz and setup.sh TARGET, for Python 3.12)
#     -> .device/wheels/  wheels of what the machine's own Python lacks (Lightning, PEFT, TensorBoard)
#     -> .device/babyai/  wheels of BabyAI (minigrid, pygame-ce) for CPU sweeps on the machine's cores
#     -> .gl/             the GL loader libraries EGL rendering needs (Debian packages)
# There (python3 with torch and transformers; the repository root is the working directory):
#   source bench/device_setup.sh install
#     -> packages in /tmp/site, LIBERO's config, MUJOCO_GL=egl and the NVIDIA EGL vendor file
#        (carry .device/bundle, .device/wheels and .gl; about 57 MiB with the tree for LIBERO-Goal)
#   source bench/device_setup.sh install-babyai
#     -> the packages BabyAI runs need (scripts/sweep.py on configs/quickstart.yaml), no LIBERO
#        (carry .device/bundle/wheels, .device/wheels and .device/babyai; about 40 MiB with the tree)
# Both .device/ and .gl/ are git-ignored; what a call carries must fit the machine's transfer limit.
set -uo pipefail
mode=${1:-install}
EXTRA_WHEELS=(lightning==2.6.6 peft==0.21.2 tensorboard==2.21.0 absl-py==2.5.1 Markdown==3.11.3 Werkzeug==3.1.9)
BABYAI_WHEELS=(minigrid==3.2.0 pygame-ce==2.5.8)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any)

if [ "$mode" = pack ]; then
  set -e
  : "${OFFLINE_BUNDLE:?set OFFLINE_BUNDLE to the offline LIBERO packer (python script)}"
  LIBERO_CONFIG_PATH=${LIBERO_CONFIG_PATH:-$HOME/.cache/crl_vla_kit/libero} MUJOCO_GL=egl EGL_PLATFORM=surfaceless \
    .venv/bin/python "$OFFLINE_BUNDLE" --suites libero_goal --out .device/bundle
  plat=(); for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .device/wheels "${EXTRA_WHEELS[@]}"
  # TensorBoard's web front end (~4.9 MB) is not needed to write event files: drop it from the
  # wheel (and its RECORD) so the bundle leaves room in the transfer limit.
  .venv/bin/python - .device/wheels/tensorboard-*.whl <<'PY'
import os, sys, zipfile
src, drop = sys.argv[1], ("tensorboard/webfiles.zip", "tensorboard/plugins/projector/tf_projector_plugin/projector_binary.js")
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED) as zo:
    for item in zi.infolist():
        if item.filename in drop:
            continue
        data = zi.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if l.split(b",")[0].decode() not in drop)
        zo.writestr(item, data)
os.replace(src + ".tmp", src)
PY
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .device/babyai "${BABYAI_WHEELS[@]}"
  mkdir -p .gl /tmp/amd64/partial
  o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
  apt-get "${o[@]}" update >/dev/null
  (cd .gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
  du -sh .device .gl
elif [ "$mode" = install ]; then
  if [ ! -f /tmp/site/.kit_installed ]; then  # a machine kept warm between calls is set up once
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
    bash .device/bundle/setup.sh /tmp/site >/dev/null || return 1 2>/dev/null || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .device/wheels/*.whl || return 1 2>/dev/null || exit 1
    touch /tmp/site/.kit_installed
  fi
  export PYTHONPATH=/tmp/site:$PWD LIBERO_CONFIG_PATH=/tmp/site/.libero MUJOCO_GL=egl PYOPENGL_PLATFORM=egl
  vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  [ -f "$vendor" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$vendor
  python3 -c "import torch, lightning, peft, torchrl, transformers; print('device ready:', torch.__version__, \
torch.cuda.get_device_name(0), 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
elif [ "$mode" = install-babyai ]; then
  if [ ! -f /tmp/site/.kit_babyai ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .device/bundle/wheels/*.whl .device/wheels/*.whl .device/babyai/*.whl || return 1 2>/dev/null || exit 1
    touch /tmp/site/.kit_babyai
  fi
  export PYTHONPATH=/tmp/site:$PWD
  python3 -c "import torch, lightning, torchrl, minigrid; print('device ready (BabyAI):', torch.__version__, \
'lightning', lightning.__version__, 'minigrid', minigrid.__version__, 'cores', __import__('os').cpu_count())"
else
  echo "usage: bash bench/device_setup.sh pack | source bench/device_setup.sh install | install-babyai" >&2
fi
