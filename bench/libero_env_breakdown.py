"""Where a LIBERO step's time goes, one env in-process (no pool), same task and actions:
raw ``OffScreenRenderEnv`` vs torchrl's ``LiberoEnv`` (the kit's ``InitStateLiberoEnv``) vs the
kit's worker env (+ OpenVLA image pipeline and gripper transform), with and without the JPEG
round trip. Median ms per step over 3 reps of 40 steps. Use a small render size so that
software rendering does not hide the wrappers' cost.

Usage: MUJOCO_GL=egl python bench/libero_env_breakdown.py [RENDER_PX, default 64]
"""
import os, sys, time, statistics
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np, torch
from datamodules.libero_setup import setup_libero
setup_libero()
from datamodules.libero import worker_env, LIBERO_OPTIONS
from libero.libero import benchmark, get_libero_path
from libero.libero.envs import OffScreenRenderEnv
torch.set_num_threads(1)
R = int(sys.argv[1]) if len(sys.argv) > 1 else 64
task = benchmark.get_benchmark_dict()["libero_goal"]().get_task(8)
raw = OffScreenRenderEnv(bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file),
                         camera_heights=R, camera_widths=R, camera_names=["agentview"])
raw.seed(0); raw.reset()
a = np.zeros(7); a[-1] = -1
def t_raw(n=40):
    t = time.perf_counter()
    for _ in range(n): raw.step(a)
    return (time.perf_counter() - t) / n * 1e3
def make(**kw):
    e = worker_env("libero_goal", 8, seed=0, max_steps=10000, init_state_id=0, render_gpu=None,
                   options={**LIBERO_OPTIONS, "render_size": R, "image_size": min(224, R), **kw})
    td = e.reset(); return e, td
kit, tdk = make()
kitnj, tdn = make(jpeg_quality=None, center_crop=False)
act = torch.tensor([0.]*6 + [1.])
def t_kit(e, td, n=40):
    t = time.perf_counter()
    for _ in range(n):
        td = e.step(td.set("action", act.clone()))["next"]
    return (time.perf_counter() - t) / n * 1e3
base = kit.base_env
def t_base(n=40):
    td = base.reset()
    t = time.perf_counter()
    for _ in range(n):
        td = base.step(td.set("action", torch.tensor([0.]*6 + [-1.])))["next"]
    return (time.perf_counter() - t) / n * 1e3
for f in (t_raw, lambda: t_kit(kit, tdk), lambda: t_kit(kitnj, tdn), t_base): f()  # warm
res = {k: [] for k in ("raw", "kit", "kit_nojpeg", "torchrl_LiberoEnv")}
for _ in range(3):
    res["raw"].append(t_raw()); res["kit"].append(t_kit(kit, tdk)); res["kit_nojpeg"].append(t_kit(kitnj, tdn)); res["torchrl_LiberoEnv"].append(t_base())
for k, v in res.items(): print(f"{k:20s} ms/step median {statistics.median(v):.1f}")
