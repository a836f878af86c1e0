"""Exact resume: a tiny run stopped at five points (a SIGTERM and a SIGINT during collection, SIGKILLs
during the after-task evaluation, during an update and in the middle of a checkpoint write) and
resumed each time from its latest checkpoint ends with the uninterrupted run's metrics.json and
weights, bit for bit."""
import glob
import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_train, small_config

# (point, iteration, signal, step): tests/helpers/kill_at.py; 2 tasks x 2 iterations = iterations 0-3
STOPS = [("collection", 1, "SIGTERM", 3),  # last.ckpt of iteration 0 on disk: stops at once, exit 143
         ("evaluation", 1, "SIGKILL", 4),  # after the periodic one (2 batches), in task 0's end evaluation:
                                           # task0_end.ckpt is written before it, and resumed from
         ("collection", 3, "SIGINT", 2),   # exit 130; the resumed run replays task 1's first rollout
         ("update", 3, "SIGKILL", 3),
         ("checkpoint", 3, "SIGKILL", 1)]  # half of task1_end.ckpt written: the previous files stay intact


def config(tmp_path, stop=None) -> str:
    """2 tasks x 2 iterations, a periodic evaluation every 2 iterations (at each task's last one),
    every run of the chain in one folder (the logger's version fixed, as scripts/sweep.py does)."""
    kill = [] if stop is None else [{"class_path": "tests.helpers.kill_at.KillAt", "init_args": dict(
        point=stop[0], epoch=stop[1], signal_name=stop[2], step=stop[3])}]
    path = small_config(tmp_path, "exact", iterations=2, tasks=2, eval_episodes=2, extra_callbacks=kill)
    cfg = OmegaConf.load(path)
    cfg.trainer.logger.init_args.version = "fixed"
    next(c for c in cfg.trainer.callbacks if c.class_path.endswith("PerTaskEvaluation")).init_args.every_n_iterations = 2
    OmegaConf.save(cfg, path)
    return path


def newest_checkpoint(ckpt_dir) -> str:
    return max(glob.glob(os.path.join(ckpt_dir, "*.ckpt")), key=os.path.getmtime)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    res = run_train("--config", config(d), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return os.path.join(d, "runs", "exact", "fixed")


@pytest.mark.slow
def test_stopped_five_times_and_resumed_is_bit_identical(uninterrupted, tmp_path):
    run_dir = os.path.join(tmp_path, "runs", "exact", "fixed")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    ckpt = None
    for stop in STOPS:
        res = run_train("--config", config(tmp_path, stop), *(["--ckpt_path", ckpt] if ckpt else []), timeout=900)
        name = stop[2]
        expected = {"SIGKILL": -9, "SIGTERM": 143, "SIGINT": 130}[name]
        assert res.returncode == expected, (stop, res.stderr[-3000:])
        partial = [f for f in os.listdir(ckpt_dir) if f.endswith(".partial")]
        assert partial == ([".task1_end.ckpt.partial"] if stop[0] == "checkpoint" else []), partial
        if name == "SIGKILL":
            ckpt = newest_checkpoint(ckpt_dir)
            assert os.path.basename(ckpt) == ("task0_end.ckpt" if stop[0] == "evaluation" else "last.ckpt")
        else:  # the run names its checkpoint and the command that resumes it
            lines = res.stderr.strip().splitlines()
            assert lines[-2].startswith(f"[{name}] stopped; the last checkpoint is "), res.stderr[-2000:]
            assert lines[-1].startswith("python train.py --config ") and "--ckpt_path" in lines[-1]
            ckpt = lines[-1].rsplit("--ckpt_path ", 1)[1]
            assert ckpt == os.path.join(ckpt_dir, "last.ckpt")
        torch.load(ckpt, weights_only=False)  # whole: atomic writes leave no half file under a final name
    res = run_train("--config", config(tmp_path), "--ckpt_path", ckpt, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not [f for f in os.listdir(ckpt_dir) if f.endswith(".partial")]

    for file in ("metrics_greedy.json", "metrics.json"):  # the two evaluations of the quickstart
        with open(os.path.join(uninterrupted, file)) as f:
            expected = json.load(f)
        with open(os.path.join(run_dir, file)) as f:
            assert json.load(f) == expected and expected["complete"], file
    assert expected["env_worker_restarts"] == {"training": {"step": 0, "start": 0}, "evaluation": {"step": 0, "start": 0}}
    # the periodic evaluation at task 0's last iteration belongs to task 0 (not to the next task)
    assert [(c["iteration"], c["task_trained"], c["task_end"]) for c in expected["curves"]] == [
        (2, 0, False), (2, 0, True), (4, 1, False), (4, 1, True)]
    for name in ("last.ckpt", "task1_end.ckpt"):
        a = torch.load(os.path.join(uninterrupted, "checkpoints", name), weights_only=False)
        b = torch.load(os.path.join(ckpt_dir, name), weights_only=False)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), name
        assert a["crl"]["has_anchor"] and a["crl"]["critic_age"] == b["crl"]["critic_age"]
        for sa, sb in zip(a["optimizer_states"], b["optimizer_states"]):
            for k in sa["state"]:
                assert all(torch.equal(sa["state"][k][t], sb["state"][k][t]) for t in sa["state"][k])
