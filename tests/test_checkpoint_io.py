"""modules/checkpoint_io.py: atomic writes (a kill or a full disk mid-write leaves the previous
file intact) and safe loads (a pickle that would run code is refused before it runs)."""
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from modules.checkpoint_io import CheckpointError, atomic_save, safe_load


def _child(code: str, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT), preexec_fn=preexec)


def test_kill_during_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": torch.tensor(1)}, str(path))
    # a real SIGKILL after half of the new file's bytes went out
    res = _child(f"""
import os, signal
from modules import checkpoint_io
def half_then_die(f):
    f.write(b"x" * 100_000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint_io._atomic({str(path)!r}, half_then_die)
""")
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert safe_load(str(path), "ckpt_path")["step"].item() == 1  # untouched
    assert sorted(os.listdir(tmp_path)) == [".last.ckpt.partial", "last.ckpt"]  # the partial is hidden
    atomic_save({"step": torch.tensor(2)}, str(path))  # the next write takes the partial's place
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert safe_load(str(path), "ckpt_path")["step"].item() == 2


def _limit_file_size():
    """The disk "fills up" at 64 KiB: writes past it fail with an OS error (EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"w": torch.zeros(10)}, str(path))
    res = _child(f"""
import torch
from modules.checkpoint_io import CheckpointError, atomic_save
try:
    atomic_save({{"w": torch.ones(1_000_000)}}, {str(path)!r})
except CheckpointError as err:
    print(err)
""", preexec=_limit_file_size)
    assert res.returncode == 0, res.stderr
    assert "could not write (File too large)" in res.stdout and "previous file" in res.stdout
    assert len(res.stdout.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no partial file left
    assert torch.equal(safe_load(str(path), "ckpt_path")["w"], torch.zeros(10))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "loops": {}, "x": _Payload(marker)}, str(path))
    with pytest.raises(CheckpointError) as err:
        safe_load(str(path), "ckpt_path")
    message = str(err.value)
    assert "refused to load" in message and "posix.system" in message and "--trust_checkpoint" in message
    assert "\n" not in message and not marker.exists()
    # the opt-out really is full pickle: the payload runs (which is why it is opt-in)
    safe_load(str(path), "ckpt_path", trust=True)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", "truncated"])
def test_unreadable_files_are_one_line(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        torch.save({"w": torch.zeros(1000)}, str(path))
        content = path.read_bytes()[:1000]
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        safe_load(str(path), "ckpt_path")
    message = str(err.value)
    assert message.startswith(f"ckpt_path={str(path)!r}: ") and "\n" not in message
    assert ("empty" in message) if not content else ("not a" in message)


def test_legacy_numpy_rng_state_loads(tmp_path):
    """Checkpoints written before the RNG state became tensors hold numpy's state as an array."""
    path = tmp_path / "old.ckpt"
    torch.save({"rng": np.random.get_state()}, str(path))
    state = safe_load(str(path), "ckpt_path")["rng"]
    assert np.array_equal(state[1], np.random.get_state()[1])


def test_kit_types_in_checkpoints_load(tmp_path):
    """An RPRM checkpoint's datamodule hyperparameters hold the labelling rule (a kit dataclass)."""
    from modules.vla_rl.pseudo_labels import PseudoLabeler

    path = tmp_path / "rprm.ckpt"
    torch.save({"state_dict": {}, "datamodule_hyper_parameters": {"labeler": PseudoLabeler(final_k=7)}}, str(path))
    assert safe_load(str(path), "data.reward_shaping.checkpoint")["datamodule_hyper_parameters"]["labeler"] == \
        PseudoLabeler(final_k=7)

