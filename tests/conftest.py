import json
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

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
    """The quickstart config (merged with ``configs/ablations/<ablation>.yaml`` if given: a name or
    a list of names, merged in order) shrunk to seconds: 8 envs x 16 steps, ``eval_episodes``
    evaluation episodes per task (one env each). ``anchor=False``: no continual-learning method.
    ``switch``: more TaskSwitch arguments (e.g. ``{"success_threshold": 0.05}``)."""
    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "quickstart.yaml"))
    for overlay in [ablation] if isinstance(ablation, str) else (ablation or []):
        cfg = OmegaConf.merge(cfg, OmegaConf.load(os.path.join(ROOT, "configs", "ablations", f"{overlay}.yaml")))
    if not anchor:
        cfg.method = None
    cfg.trainer.logger.init_args.save_dir = str(tmp_path / "runs")
    cfg.trainer.logger.init_args.name = name
    cfg.trainer.enable_progress_bar = False
    cbs = []
    for cb in cfg.trainer.callbacks:
        path = cb.class_path
        if path.endswith("TaskSwitch"):
            cb.init_args.iterations_per_task = iterations
            cb.init_args.update(switch or {})
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
    only (jsonargparse prints and exits before anything is instantiated), without the
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


class TrainForkServer:
    """``tests/helpers/train_forks.py``, started at the session's first ``run_train`` and kept until its
    end: every run is a child forked after train.py's imports, not a new interpreter."""

    def __init__(self):
        self.proc = self.log = None

    def run(self, argv, timeout: float) -> SimpleNamespace:
        if self.proc is None or self.proc.poll() is not None:  # not started yet, or ended
            self.close()
            self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (the server's stderr, open while it runs)
            self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "helpers", "train_forks.py")], cwd=ROOT,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                         env=train_env())
        self.proc.stdin.write(json.dumps({"argv": list(argv), "timeout": timeout, "env": train_env()}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            self.log.seek(0)
            raise RuntimeError(f"tests/helpers/train_forks.py ended without answering: {self.log.read()[-3000:]}")
        return SimpleNamespace(**json.loads(answer))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        if self.log is not None:
            self.log.close()
            self.log = None


TRAIN_FORK_SERVER = TrainForkServer()


@pytest.fixture(scope="session", autouse=True)
def _train_fork_server():
    yield
    TRAIN_FORK_SERVER.close()


def train_env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT)


def run_train(*args, timeout=900, fresh=False):
    """``python train.py ARGS``: its ``returncode``, ``stdout`` and ``stderr``. Served by the
    session's fork server (``TrainForkServer``): the same return code and output, without the
    imports a new interpreter pays; a run past ``timeout`` seconds is killed
    (returncode -14). ``fresh``: a new interpreter (``subprocess.run``, which raises
    ``TimeoutExpired``), for DDP runs, whose launcher starts the other ranks by re-running
    the command line."""
    if fresh:
        return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, check=False,
                              capture_output=True, text=True, timeout=timeout, env=train_env())
    return TRAIN_FORK_SERVER.run(args, timeout)


def run_train_cases(tmp_path_factory, cases, args_for, timeout=300):
    """Each case's train.py run (``run_train``) in a directory of its own:
    ``args_for(case, directory)`` gives its arguments; returns [(directory, result)] in order."""
    dirs = [tmp_path_factory.mktemp(f"case{i}") for i in range(len(cases))]
    return [(d, run_train(*args_for(c, d), timeout=timeout)) for c, d in zip(cases, dirs)]
