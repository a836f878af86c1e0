"""Bad input ends in one line naming the key (or file) and what is wrong, exit status 2, and
nothing left that looks like a run. Most cases run train.main in this process (they fail before
training); the ones that need a checkpoint resume from the one a 1-iteration run writes."""
import contextlib
import glob
import io
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, print_config, run_train, small_config, train_env

CKPT_KEY = "model.policy.init_args.backbone.init_args.checkpoint"


def run_here(*args) -> tuple[int, str]:
    """``train.main(ARGS)`` in this process: its exit status and stderr."""
    import train

    threads, err = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = train.main(list(args))
    finally:
        torch.set_num_threads(threads)
    return code, err.getvalue()


def assert_one_line(code: int, stderr: str, key: str, *words: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == 2, stderr[-2000:]
    assert lines and lines[-1].startswith("error: ") and key in lines[-1], stderr[-2000:]
    assert "Traceback" not in stderr
    assert all(w in lines[-1] for w in words), lines[-1]
    return lines[-1]


def edited_config(tmp_path, edit, name="run", **kwargs) -> str:
    cfg = OmegaConf.load(small_config(tmp_path, name, **kwargs))
    edit(cfg)
    path = tmp_path / f"{name}_edited.yaml"
    OmegaConf.save(cfg, path)
    return str(path)


def _eval_max_steps_zero(cfg):
    next(c for c in cfg.trainer.callbacks if c.class_path.endswith("PerTaskEvaluation")).init_args.max_steps = 0


PARSE = [
    (["--data.stream=[{env: babyai, level: GoToObjectRoom, target: red ball, colour: red}]"], "data.stream[0].colour"),
    (["--data.stream=[{env: babyai, level: GoToObjectRoom, target: red ball, tile_size: 0}]"], "data.stream[0].tile_size"),
    (["--trainer.devices=-5"], "trainer.devices"),
    (["--trainer.devices=abc"], "trainer.devices"),
    (["--model.alpha=.nan"], "model.alpha"),
    (["--model.policy.init_args.temperature=.inf"], "model.policy.init_args.temperature"),
    (["--model.adam_eps=.nan"], "model.adam_eps"),
    (["--model.gamma=0.0001", "--model.gae_lambda=0.0001"], "model.gae_lambda"),
    (["--model.critic_hidden_sizes=[0]"], "model.critic_hidden_sizes"),
    (["--data.num_minibatches=1000"], "data.num_minibatches"),
    (["--data.stream=[{env: libero, suite: libero_goal, task_id: 8, spare_envs: 2}]",
      "--data.curriculum={window: 8, target: 0.5, temperature: 0.2, floor: 0.05}"], "data.stream[i].spare_envs=2"),
]


@pytest.mark.parametrize("case", range(len(PARSE)), ids=[" ".join(a) for a, _ in PARSE])
def test_bad_setting_is_one_line(tmp_path, case):
    args, key = PARSE[case]
    assert_one_line(*run_here("--config", small_config(tmp_path), *args), key)
    assert not glob.glob(str(tmp_path / "runs" / "*" / "version_*"))


def test_evaluation_without_steps_is_refused(tmp_path):
    assert_one_line(*run_here("--config", edited_config(tmp_path, _eval_max_steps_zero)),
                    "PerTaskEvaluation.max_steps=0")


def test_empty_config_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    assert_one_line(*run_here("--config", str(empty)), "--config", "empty")


def test_policy_checkpoint_that_is_text_or_a_training_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    assert_one_line(*run_here("--config", small_config(tmp_path), f"--{CKPT_KEY}={text}"), CKPT_KEY, "not a")
    trained = tmp_path / "run.ckpt"  # what train.py writes: state_dict, loops, ...
    torch.save({"state_dict": {}, "loops": {}, "epoch": 0}, str(trained))
    assert_one_line(*run_here("--config", small_config(tmp_path), f"--{CKPT_KEY}={trained}"), CKPT_KEY,
                    "--ckpt_path")


def test_save_dir_not_a_directory_or_read_only(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert_one_line(*run_here("--config", small_config(tmp_path), f"--trainer.logger.init_args.save_dir={afile}"),
                    "trainer.logger.init_args.save_dir", "not a directory")
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):  # root writes anywhere: a read-only filesystem instead
        read_only = "/sys/kernel"
    assert_one_line(*run_here("--config", small_config(tmp_path), f"--trainer.logger.init_args.save_dir={read_only}"),
                    "trainer.logger.init_args.save_dir", "cannot write")


def test_words_outside_the_vocabulary_and_no_run_folder_left(tmp_path):
    """The tiny VLM's word-level tokenizer would turn "green" and "key" into <unk>: refused at the
    start (after the run folder was made: the failed start removes it)."""
    line = assert_one_line(*run_here("--config", small_config(tmp_path, tasks=2), f"--{CKPT_KEY}=null",
                                     "--model.policy.init_args.backbone.init_args.words=[go to the red ball]"),
                           "data.stream[1]", "green", "key")
    assert "vocabulary" in line
    assert os.path.isdir(tmp_path / "runs") and not glob.glob(str(tmp_path / "runs" / "*" / "version_*"))


def test_command_line_null_for_a_nested_setting_is_null():
    out = print_config("--config", os.path.join(ROOT, "configs", "quickstart.yaml"), f"--{CKPT_KEY}", "null",
                       "--model.policy.init_args.backbone.init_args.position_init_std=null")
    assert "          checkpoint: null" in out and "position_init_std: null" in out


# -- with a checkpoint -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A 2-task run stopped by --trainer.max_epochs=1 after its first iteration: (dir, result, last.ckpt)."""
    d = tmp_path_factory.mktemp("stopped")
    res = run_train("--config", small_config(d, "stop", iterations=1, tasks=2, eval_episodes=1),
                    "--trainer.max_epochs=1", timeout=600)
    last = glob.glob(str(d / "runs" / "stop" / "version_*" / "checkpoints" / "last.ckpt"))
    return d, res, last[0] if last else None


@pytest.mark.slow
def test_max_epochs_before_the_end_of_the_stream_is_not_success(stopped_run):
    d, res, last = stopped_run
    assert res.returncode == 3, res.stderr[-3000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: trainer.max_epochs=1: ") and "task 2 of 2" in line and "incomplete" in line
    assert f"--ckpt_path {last} --trainer.max_epochs -1" in line


@pytest.mark.slow
@pytest.mark.parametrize("case", ["critic", "longer", "shorter", "other", "empty", "text", "truncated", "malicious"])
def test_checkpoint_that_does_not_fit(stopped_run, tmp_path, case):
    """A checkpoint of another critic width, of another stream (longer, shorter, or as long with other tasks),
    a broken file, or one that would run code while it loads."""
    _, _, last = stopped_run
    assert last is not None
    args = ["--config", small_config(tmp_path, tasks=2, eval_episodes=1)]
    ckpt, key, words = last, "ckpt_path", ()
    if case == "critic":
        args.append("--model.critic_hidden_sizes=[32,32]")
        words = ("does not fit", "critic.")
    elif case in ("longer", "shorter", "other"):
        first = "{env: babyai, level: GoToObjectRoom, target: red ball}"
        stream = {"longer": f"[{first}, {{env: babyai, level: GoToObjectRoom, target: green key}}, "
                            "{env: babyai, level: GoToObjectRoom, target: blue box}]",
                  "shorter": f"[{first}]",
                  "other": f"[{first}, {{env: babyai, level: GoToObjectRoom, target: blue box}}]"}[case]
        args.append(f"--data.stream={stream}")
        key, words = "data.stream", ("trained on the stream",)
    elif case in ("empty", "text", "truncated"):
        ckpt = str(tmp_path / "bad.ckpt")
        with open(ckpt, "wb") as f:
            f.write({"empty": b"", "text": b"a text file\n", "truncated": open(last, "rb").read()[:2000]}[case])
    else:
        marker = tmp_path / "pwned"
        state = torch.load(last, weights_only=False)
        state["payload"] = _Payload(str(marker))
        ckpt = str(tmp_path / "evil.ckpt")
        torch.save(state, ckpt)
        words = ("refused to load", "--trust_checkpoint")
    assert_one_line(*run_here(*args, f"--ckpt_path={ckpt}"), key, *words)
    assert not glob.glob(str(tmp_path / "runs" / "*" / "version_*"))
    if case == "malicious":
        assert not marker.exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _disk_fills_at_256_kib():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


@pytest.mark.slow
def test_full_disk_is_one_line(tmp_path):
    """The first checkpoint (~1 MiB) does not fit on the "disk" (a 256 KiB file-size limit): one line
    naming it, exit 2, no partial checkpoint."""
    cfg = small_config(tmp_path, "full", iterations=1, tasks=1, eval_episodes=1)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", cfg], cwd=ROOT, text=True,
                         capture_output=True, timeout=600, env=train_env(), preexec_fn=_disk_fills_at_256_kib)
    line = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and line.startswith("error: ") and ".ckpt: could not write" in line, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not [p for p in glob.glob(str(tmp_path / "runs" / "**" / "*"), recursive=True)
                if ".ckpt" in os.path.basename(p)]
