import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ["go to the red ball", "go to the green key", "go to the blue box"]


@pytest.fixture
def tiny_policy():
    from modules.policy import TinyLlava, TokenVLAPolicy

    def make(action_tokens=1, action_bins=3, temperature=1.0, seed=0, feature_pooling="image_mean",
             image_position="first"):
        torch.manual_seed(seed)
        bb = TinyLlava(words=WORDS + ["pick up a"], action_bins=action_bins, hidden_size=32,
                       vision_hidden_size=32, layers=2, vision_layers=1, heads=2, seed=seed,
                       image_position=image_position)
        return TokenVLAPolicy(bb, action_tokens=action_tokens, action_bins=action_bins,
                              temperature=temperature, feature_pooling=feature_pooling)
    return make


def small_config(tmp_path, name="run", iterations=2, anchor=True, extra=None, tasks=3,
                 ckpt_every=1, extra_callbacks=None, ablation=None, videos=0, switch=None,
                 eval_episodes=4):
    """The quickstart config (merged with ``configs/ablations/<ablation>.yaml`` if given)
    shrunk to seconds: 8 envs x 16 steps, ``eval_episodes`` evaluation episodes per task (one
    env each). ``switch``: more TaskSwitch arguments (e.g. ``{"success_threshold": 0.05}``)."""
    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "quickstart.yaml"))
    if ablation:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(os.path.join(ROOT, "configs", "ablations", f"{ablation}.yaml")))
    cfg.trainer.logger.init_args.save_dir = str(tmp_path / "runs")
    cfg.trainer.logger.init_args.name = name
    cfg.trainer.enable_progress_bar = False
    cbs = []
    for cb in cfg.trainer.callbacks:
        path = cb.class_path
        if path.endswith("TaskSwitch"):
            cb.init_args.iterations_per_task = iterations
            cb.init_args.update(switch or {})
        if path.endswith("AnchorCriticFreeze") and not anchor:
            continue
        if path.endswith("PerTaskEvaluation"):
            cb.init_args.episodes_per_task = eval_episodes
            cb.init_args.num_envs = eval_episodes
            cb.init_args.max_steps = 64
            cb.init_args.videos_per_task = videos
        if path.endswith("TaskProgressBar"):
            continue
        if path.endswith("ModelCheckpoint"):
            cb.init_args.every_n_epochs = ckpt_every
        cbs.append(cb)
    cfg.trainer.callbacks = cbs + list(extra_callbacks or [])
    cfg.data.stream = cfg.data.stream[:tasks]
    cfg.data.num_envs = 8
    cfg.data.frames_per_batch = 128
    cfg.data.num_minibatches = 2
    cfg.data.ppo_epochs = 2
    for key, value in (extra or {}).items():
        OmegaConf.update(cfg, key, value)
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(cfg, path)
    return str(path)


def print_config(*args) -> str:
    """``train.py ARGS --print_config`` in this process, its stdout. The parse-and-print path
    only (jsonargparse prints and exits before anything is instantiated), without the ~12 s of
    imports a ``train.py`` subprocess pays; train.py's thread setting is undone after."""
    import contextlib
    import io

    import train

    threads, out = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            train.main([*args, "--print_config"])
    finally:
        torch.set_num_threads(threads)
    assert exit_.value.code in (0, None), out.getvalue()[-2000:]
    return out.getvalue()


def run_train(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def run_train_many(runs, timeout=300):
    """``run_train(*args)`` for each argument list in ``runs``, each in its own process forked
    from one that has done train.py's imports (``tests/train_forks.py``): the same return code,
    stdout and stderr, without ~12 s of imports per run. A hung run is killed after ``timeout``
    seconds (returncode -14)."""
    import json
    from types import SimpleNamespace

    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train_forks.py")], cwd=ROOT, check=False,
                         input=json.dumps({"runs": [list(r) for r in runs], "timeout": timeout}),
                         capture_output=True, text=True, timeout=timeout * len(runs) + 120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return [SimpleNamespace(**r) for r in json.loads(res.stdout)]


def run_train_cases(tmp_path_factory, cases, args_for, timeout=300):
    """Each case's train.py run (``run_train_many``) in a directory of its own:
    ``args_for(case, directory)`` gives its arguments; returns [(directory, result)] in order."""
    dirs = [tmp_path_factory.mktemp(f"case{i}") for i in range(len(cases))]
    return list(zip(dirs, run_train_many([args_for(c, d) for c, d in zip(cases, dirs)], timeout=timeout)))
