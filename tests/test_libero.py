"""Real LIBERO on CPU (software EGL): one task of each suite, the OpenVLA observation
pipeline on a real frame, the action convention, stream parsing and bad input."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("libero")
pytestmark = pytest.mark.libero

from datamodules.libero import LIBERO_OPTIONS, libero_action, worker_env  # noqa: E402
from datamodules.libero_env import chw_frame  # noqa: E402
from datamodules.libero_setup import task_language  # noqa: E402
from datamodules.tasks import parse_stream  # noqa: E402

# one task per suite whose goal is a conjunction of On/In predicates (objects can be moved
# there by setting the simulator state); libero_10 task 0 needs two objects in the basket
SUITE_TASKS = [("libero_spatial", 0), ("libero_object", 0), ("libero_goal", 8), ("libero_10", 0),
               ("libero_90", 9)]
OPEN_GRIPPER_NOOP = [0.0] * 6 + [1.0]  # OpenVLA convention: gripper 1 = open


def _small(**kw):
    return {**LIBERO_OPTIONS, "render_size": 128, "image_size": 64, **kw}


def satisfy_goal(ose) -> None:
    """Move every object of the task's BDDL goal (On/In predicates) just above its goal
    object or region by setting the free joints' qpos; gravity does the rest."""
    env = ose.env
    sim = env.sim
    goals = env.parsed_problem["goal_state"]
    for k, (pred, obj_name, target) in enumerate(goals):
        assert pred in ("on", "in"), f"test task needs an On/In goal, got {pred}"
        if target in env.object_sites_dict:
            where = np.array(sim.data.get_site_xpos(target))
        else:
            where = np.array(sim.data.body_xpos[env.obj_body_id[target]])
        joint = env.get_object(obj_name).joints[-1]  # the object's free joint
        qpos = np.array(sim.data.get_joint_qpos(joint))
        qpos[:3] = where + np.array([0.0, 0.025 * (k - (len(goals) - 1) / 2), 0.06])
        sim.data.set_joint_qpos(joint, qpos)
        sim.data.set_joint_qvel(joint, np.zeros(6))
    sim.forward()


@pytest.mark.parametrize("suite,task_id", SUITE_TASKS)
def test_goal_state_gives_success_and_done(suite, task_id):
    env = worker_env(suite, task_id, seed=0, max_steps=60, init_state_id=0, render_gpu=None, options=_small())
    try:
        td = env.reset()
        assert td["language_instruction"] == task_language(suite, task_id)
        assert td["observation", "image"].shape == (3, 64, 64) and td["observation", "image"].dtype == torch.uint8
        assert not td["success"].item()
        # init state 0 is the suite's stored state 0 (after the 10 settle steps the scene moved little)
        base = env
        assert base._current_init_state_index == 0
        td["action"] = torch.tensor(OPEN_GRIPPER_NOOP)
        td = env.step(td)
        assert not td["next", "success"].item() and not td["next", "done"].item()
        # robosuite computes only the observables the TensorDict reads; the state is still the
        # gripper's position (robosuite samples it within the step's physics substeps)
        sim_env = base._env.env
        assert {k for k in sim_env._get_observations() if not k.endswith("-state")} == base.read_keys
        eef = sim_env.sim.data.site_xpos[sim_env.robots[0].eef_site_id]
        assert np.allclose(td["next", "observation", "state"][:3].numpy(), eef, atol=1e-3)
        satisfy_goal(base._env)
        for step in range(40):
            td = env.step(td.get("next").clone().set("action", torch.tensor(OPEN_GRIPPER_NOOP)))
            if td["next", "done"].item():
                break
        assert td["next", "success"].item(), f"{suite} task {task_id}: no success after placing the objects"
        assert td["next", "done"].item() and td["next", "terminated"].item()
        assert not td["next", "truncated"].item()
        assert td["next", "reward"].item() == 1.0
    finally:
        env.close()


def test_openvla_observation_on_a_real_frame():
    """The kit's image = OpenVLA's LIBERO evaluation pipeline: flip 180 -> JPEG q95 (on the 256 px
    render) -> TF Lanczos3 to 224 -> TF crop_and_resize of the 0.9-area centre box, recomputed
    here from the simulator's raw render with numpy, PIL and torchrl's TF-compatible reference."""
    from PIL import Image
    from torchrl.data.vla.preprocessing import _fractional_center_crop, _lanczos3_resize

    opts = {**LIBERO_OPTIONS, "render_size": 256}
    env = worker_env("libero_goal", 8, seed=0, max_steps=20, init_state_id=0, render_gpu=None, options=opts)
    try:
        td = env.reset()
        raw = env._env.env._get_observations(force_update=True)["agentview_image"]  # HWC, upside down
        assert raw.shape == (256, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(raw[::-1, ::-1])).save(buf, format="JPEG", quality=95)
        buf.seek(0)
        jpeg = torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1)[None]
        resized = _lanczos3_resize(jpeg.float(), (224, 224)).round_().clamp_(0, 255).to(torch.uint8)
        expected = _fractional_center_crop(resized, (224, 224))[0].permute(1, 2, 0).numpy()
        # the kit's read of a frame (one strided copy) is torchrl's (flip, then permute), bit for bit
        from torchrl.envs.libs.libero import LiberoWrapper

        for flip in (False, True):
            env.flip_image = flip
            assert torch.equal(chw_frame(raw, flip), LiberoWrapper._read_image(env, raw))
            assert chw_frame(raw, flip).is_contiguous()
        # the kit's path on the same frame: the env's read (flip + OpenVLA's pipeline)
        got = env._read_image(raw).permute(1, 2, 0).numpy()
        assert got.shape == (224, 224, 3)
        diff = np.abs(got.astype(int) - expected.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
        # the reset observation is that pipeline on the reset render (a re-render after
        # sim.forward() differs in a few pixels, which JPEG spreads a little)
        diff = np.abs(td["observation", "image"].permute(1, 2, 0).numpy().astype(float) - expected)
        assert diff.mean() < 0.5
        # and it is really the flipped scene: the raw frame's top-left is the kit's bottom-right
        assert np.abs(raw[::-1, ::-1].astype(float) - raw.astype(float)).mean() > 5.0
    finally:
        env.close()


def test_soft_reset_plays_the_layout_a_hard_reset_plays():
    """A soft reset (the default ``hard_reset: false``) reuses the compiled model. From the same
    numpy state it places the objects and fixtures where robosuite's hard reset (model, sim and
    renderer rebuilt) places them: the same fixture positions, the same first observation, the
    same simulator state and the same frames for the first steps of a rollout, also after an
    episode that closed the gripper (whose ramped command a soft reset must not carry over)."""
    env = worker_env("libero_goal", 8, seed=0, max_steps=50, init_state_id=3, render_gpu=None,
                     options=_small(jpeg_quality=None))
    try:
        robosuite_env = env._env.env
        assert robosuite_env.hard_reset is False  # the option reaches robosuite
        move = [0.3, -0.2, 0.1, 0.0, 0.0, 0.05]
        actions = [torch.tensor(move + [1.0])] * 3 + [torch.tensor(move + [0.0])] * 3  # open, then close

        def episode(hard: bool, numpy_seed: int):
            robosuite_env.hard_reset = hard
            np.random.seed(numpy_seed)
            td = env.reset()
            frames, states = [td["observation", "image"]], [robosuite_env.sim.get_state().flatten()]
            for action in actions:
                td = env.step(td.set("action", action))["next"]
                frames.append(td["observation", "image"])
                states.append(robosuite_env.sim.get_state().flatten())
            return torch.stack(frames), np.stack(states), robosuite_env.sim.model.body_pos.copy()

        hard = episode(True, 5)
        other = episode(False, 6)
        soft = episode(False, 5)
        assert np.array_equal(hard[2], soft[2])              # fixtures and objects where the hard reset put them
        assert np.abs(hard[2] - other[2]).max() > 1e-3       # (another numpy state moves the fixtures)
        assert torch.equal(hard[0][0], soft[0][0])           # the same first observation
        assert np.array_equal(hard[1], soft[1])              # the same simulator states
        assert torch.equal(hard[0], soft[0])                 # and the same frames
    finally:
        env.close()


def test_gripper_convention_and_clipping():
    """OpenVLA gripper g (1 open, 0 close) -> LIBERO -sign(2g - 1) (-1 open, +1 close);
    every dimension clipped to the env's bounds [-1, 1]; the env's step applies it."""
    env = worker_env("libero_goal", 8, seed=0, max_steps=20, init_state_id=0, render_gpu=None, options=_small())
    try:
        a = torch.tensor([[0.5, -2.0, 0.1, 0.0, 0.0, 3.0, 0.9],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]])
        out = libero_action(a, env.sim_low, env.sim_high)
        assert out[:, -1].tolist() == [-1.0, 1.0, -1.0]  # open, close, 0.5 -> 2g-1 = 0 -> open
        assert out[0, :6].tolist() == pytest.approx([0.5, -1.0, 0.1, 0.0, 0.0, 1.0])
        assert a[0, 1].item() == -2.0  # the policy's action is left as it was
        spec = env.action_spec  # what the policy sees: OpenVLA's gripper range [0, 1]
        assert spec.space.low[-1].item() == 0.0 and spec.space.high[-1].item() == 1.0
        assert env.sim_low[-1].item() == -1.0 and env.sim_high[-1].item() == 1.0

        def fingers_after(g: float) -> float:  # |finger qpos| (state[7:9]) after 8 steps at OpenVLA gripper g
            td = env.reset()
            for _ in range(8):
                td = env.step_mdp(env.step(td.set("action", torch.tensor([0.0] * 6 + [g]))))
            return td["observation", "state"][7:9].abs().sum().item()

        opened, closed = fingers_after(1.0), fingers_after(0.0)
        assert closed < 0.5 * opened, (opened, closed)  # OpenVLA's 0 closes the fingers in the sim
    finally:
        env.close()


def test_stream_parsing_and_bad_input():
    tasks = parse_stream([{"env": "libero", "suite": "libero_goal", "task_ids": [0, 8]},
                          {"env": "libero", "suite": "libero_10", "task_id": 3, "max_steps": 50,
                           "render_size": 128}])
    assert [t.name for t in tasks] == ["libero_goal:0", "libero_goal:8", "libero_10:3"]
    assert tasks[1].instruction == "put the bowl on the plate"
    assert tasks[2].max_steps == 50 and tasks[2].params == {"render_size": 128}
    for entry, key in [({"suite": "libero_11", "task_id": 0}, "data.stream[0].suite='libero_11'"),
                       ({"suite": "libero_goal", "task_id": 10}, "data.stream[0].task_id=10"),
                       ({"suite": "libero_goal", "task_id": 0, "render": 1}, "data.stream[0].render=1"),
                       ({"suite": "libero_goal", "task_id": 0, "start_method": "fork"},
                        "data.stream[0].start_method='fork'"),
                       ({"suite": "libero_goal", "task_id": 0, "spare_envs": -1}, "data.stream[0].spare_envs=-1"),
                       ({"suite": "libero_goal", "task_ids": []}, "data.stream[0].task_ids=[]")]:
        with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
            parse_stream([{"env": "libero", **entry}])


def test_killed_and_hung_workers_are_restarted_mid_rollout():
    """A worker killed (SIGKILL) and one hung (SIGSTOP, caught by the step timeout) during a
    real Collector rollout: both episodes end as failures with a real observation, the
    workers come back, the rollout completes with finite values."""
    import os
    import signal

    from torchrl.collectors import Collector

    from datamodules.tasks import make_env

    task = parse_stream([{"env": "libero", "suite": "libero_goal", "task_id": 8, "max_steps": 40,
                          "render_size": 64, "image_size": 32, "jpeg_quality": None, "center_crop": False,
                          "step_timeout": 8.0}])[0]
    env = make_env(task, 2, seed=0)
    noop = torch.tensor(OPEN_GRIPPER_NOOP)
    calls = []

    def policy(td):
        calls.append(1)
        if len(calls) == 4:
            os.kill(env.worker_pid(0), signal.SIGKILL)
        if len(calls) == 7:
            os.kill(env.worker_pid(1), signal.SIGSTOP)
        return td.set("action", noop.expand(2, 7).clone())

    collector = Collector(env, policy, frames_per_batch=2 * 12, total_frames=-1)
    try:
        rollout = next(iter(collector))
    finally:
        collector.shutdown()
        env.close()
    failed = rollout["next", "env_failed"].squeeze(-1)  # [2 envs, 12 steps]
    assert failed.sum(1).tolist() == [1, 1] and env.failures == 2
    for i in range(2):
        t = int(failed[i].nonzero())
        assert rollout["next", "done"][i, t].item() and rollout["next", "truncated"][i, t].item()
        assert not rollout["next", "terminated"][i, t].item() and not rollout["next", "success"][i, t].item()
        assert rollout["next", "reward"][i, t].item() == 0.0
        assert t < 11, "the env must continue after its worker was restarted"
        assert not rollout["next", "done"][i, t + 1:].any()  # the fresh worker runs normally
    assert torch.isfinite(rollout["next", "reward"]).all() and torch.isfinite(rollout["observation", "state"]).all()
    img = rollout["next", "observation", "image"]
    assert img.dtype == torch.uint8 and img.shape == (2, 12, 3, 32, 32)


def test_a_spare_worker_starts_the_next_episode_in_a_real_rollout():
    """``spare_envs: 1`` with one env: a real Collector rollout whose episodes end every 5 steps;
    each episode start after the first is served by the worker that reset in the background (slot
    0 alternates between the two processes), and the episodes are real LIBERO episodes."""
    from torchrl.collectors import Collector

    from datamodules.tasks import make_env

    task = parse_stream([{"env": "libero", "suite": "libero_goal", "task_id": 8, "max_steps": 5,
                          "render_size": 64, "image_size": 32, "jpeg_quality": None, "center_crop": False,
                          "spare_envs": 1}])[0]
    env = make_env(task, 1, seed=0)
    pids = []

    def policy(td):  # a policy slow enough for the background reset to finish during the episode
        pids.append(env.worker_pid(0))
        for w in list(env._spares):
            assert env._poll_spare(w, 120.0)
        return td.set("action", torch.tensor(OPEN_GRIPPER_NOOP).expand(1, 7).clone())

    collector = Collector(env, policy, frames_per_batch=12, total_frames=-1)
    try:
        rollout = next(iter(collector))
    finally:
        collector.shutdown()
        env.close()
    done = rollout["next", "done"].reshape(-1)
    assert done.nonzero().flatten().tolist() == [4, 9] and env.spare_swaps == 2
    turns = [p for k, p in enumerate(pids) if k == 0 or p != pids[k - 1]]
    assert len(turns) == 3 and turns[0] == turns[2] != turns[1]  # two workers take turns
    assert not rollout["next", "env_failed"].any()
    ids = rollout["init_state_id"].reshape(-1)
    assert ((ids >= 0) & (ids < 50)).all() and ids[0] == ids[4] and ids[5] == ids[9]
    assert torch.isfinite(rollout["observation", "state"]).all()


def test_image_pipeline_in_the_main_process_gives_the_same_observations():
    """``image_device``: the workers JPEG, the main process resizes and crops the batch. Same
    pixels as the pipeline run in each worker, through the real pool, reset and step."""
    from datamodules.tasks import make_env

    def rollout(**opts):
        task = parse_stream([{"env": "libero", "suite": "libero_goal", "task_id": 8, "max_steps": 40,
                              "render_size": 128, "image_size": 64, **opts}])[0]
        env = make_env(task, 2, seed=0, init_state_ids=[0, 1])
        try:
            td = env.reset()
            assert env.observation_spec["observation", "image"].shape == (2, 3, 64, 64)
            nxt = env.step(td.set("action", torch.tensor(OPEN_GRIPPER_NOOP).expand(2, 7).clone()))["next"]
            return td["observation", "image"], nxt["observation", "image"]
        finally:
            env.close()

    in_workers, in_main = rollout(), rollout(image_device="cpu")
    for a, b in zip(in_workers, in_main):
        assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(in_workers[0][0], in_workers[0][1])  # two init states: two different scenes


def test_a_renderer_that_cannot_render_is_one_clear_line(tmp_path):
    """MUJOCO_GL=osmesa where OSMesa is missing (as on the CI image): a traceback from deep in
    an import otherwise; here one line naming MUJOCO_GL, exit 2, nothing written."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from datamodules.libero_setup import check_renderer

    try:
        check_renderer("osmesa")
        pytest.skip("OSMesa renders on this machine")
    except ValueError:
        pass
    env = dict(os.environ, PYTHONPATH=ROOT, MUJOCO_GL="osmesa")
    env.pop("CRL_KIT_RENDERER_OK", None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                          os.path.join(ROOT, "configs/libero_smoke.yaml"), "--trainer.logger.init_args.save_dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MUJOCO_GL='osmesa'"), res.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_software_rendering_beside_a_gpu_is_named():
    """check_renderer returns MuJoCo's GL renderer (Mesa's llvmpipe on the CPU machines), and a
    software renderer beside a CUDA GPU gets one warning naming it and the fix; a GPU renderer or
    a machine without CUDA gets none."""
    from datamodules.libero_setup import check_renderer, software_rendering_warning

    name = check_renderer("egl")
    assert name and name != "unknown"
    warning = software_rendering_warning("llvmpipe (LLVM 15.0.6, 256 bits)", cuda=True)
    assert "llvmpipe (LLVM 15.0.6, 256 bits)" in warning and "__EGL_VENDOR_LIBRARY_FILENAMES" in warning
    assert software_rendering_warning("llvmpipe (LLVM 15.0.6, 256 bits)", cuda=False) is None
    assert software_rendering_warning("NVIDIA H100 80GB HBM3/PCIe/SSE2", cuda=True) is None


@pytest.mark.slow
def test_libero_smoke_config_end_to_end(tmp_path):
    """configs/libero_smoke.yaml through train.py: real LIBERO rollouts, CRL on 2 tasks, the
    R matrix of the stream's shape and one MP4 per task and evaluation."""
    import glob
    import json
    import os

    from conftest import run_train
    from helpers.videos import read_mp4

    res = run_train("--config", "configs/libero_smoke.yaml",
                    f"--trainer.logger.init_args.save_dir={tmp_path}",
                    timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "libero_smoke" / "version_*" / "metrics.json"))
    m = json.load(open(path))
    assert m["complete"] and len(m["b"]) == 2 and [len(r) for r in m["R"]] == [2, 2]
    assert all(0.0 <= v <= 1.0 for r in m["R"] for v in r)
    videos = sorted(glob.glob(os.path.join(os.path.dirname(path), "videos", "*", "*.mp4")))
    assert [os.path.relpath(v, os.path.dirname(path)) for v in videos] == [
        f"videos/{w}/task{i}_ep0.mp4" for w in ("after_task0", "after_task1", "before") for i in (0, 1)]
    frames = read_mp4(videos[0])
    # an evaluation episode runs to its 32-step limit unless it succeeds; frames are 64 px
    assert 1 <= len(frames) <= 32 and frames[0].shape == (64, 64, 3)
    assert float(np.std(frames[0])) > 5  # a rendered scene, not a blank frame


@pytest.mark.slow
def test_one_pool_evaluation_plays_the_per_task_pools_episodes(tmp_path):
    """``train.py test`` of configs/libero_smoke.yaml's policy, per-task pools (2 envs, 2 pools
    per task) against one pool of 2 workers (one per task, its 4 episodes back to back, soft
    resets, idle workers left out of the steps): every episode is laid out from its own scene
    seed, so the episodes are the same: the success, and frame for frame the first two episodes
    of both tasks (the second one played after the first on the same worker in one pool)."""
    import glob
    import json

    import yaml
    from conftest import run_train
    from helpers.videos import read_mp4

    out = {}
    for one_pool in (False, True):
        name = f"one_pool_{one_pool}"
        overlay = tmp_path / f"{name}.yaml"
        overlay.write_text(yaml.safe_dump({"trainer": {
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": name}},
            "callbacks": [{"class_path": "callbacks.evaluation.PerTaskEvaluation",
                           "init_args": {"episodes_per_task": 4, "num_envs": 2, "greedy": True,
                                         "videos_per_task": 2, "one_pool": one_pool}}]}}))
        res = run_train("test", "--config", "configs/libero_smoke.yaml", "--config", str(overlay), timeout=1200)
        assert res.returncode == 0, res.stderr[-3000:]
        (log_dir,) = glob.glob(str(tmp_path / name / "version_*"))
        out[one_pool] = (json.load(open(f"{log_dir}/evaluation.json"))["success"],
                         [read_mp4(f"{log_dir}/videos/evaluation/task{i}_ep{e}.mp4") for i in (0, 1) for e in (0, 1)])
    assert len(out[True][0]) == 2 and out[True][0] == out[False][0]
    for a, b in zip(out[True][1], out[False][1]):
        assert len(a) == len(b) > 1 and all(np.array_equal(x, y) for x, y in zip(a, b))
    # different initial states and scenes: episode 0 and 1 of a task start from different frames
    assert not np.array_equal(out[True][1][0][0], out[True][1][1][0])


def test_render_gpus_are_the_ranks_own_under_ddp_and_all_gpus_in_one_process(monkeypatch):
    """A 4-GPU host: one process renders round-robin on 0..3; DDP rank 2 (its current device 2)
    renders on GPU 2 only; no CUDA: software rendering (no GPU id)."""
    from datamodules.libero import render_gpu_ids

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert render_gpu_ids() == [0, 1, 2, 3]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    assert render_gpu_ids() == [2]
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    assert render_gpu_ids() == [0, 1, 2, 3]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert render_gpu_ids() == []
