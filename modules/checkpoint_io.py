"""Checkpoint files: atomic writes and safe loads.

Writes (``atomic_save``, ``atomic_write_text``): the bytes go to a hidden temporary file in the
destination's own directory (``.<name>.partial``), are flushed and fsync'ed, and the file is
renamed over the destination (``os.replace``: atomic on one filesystem), then the directory is
fsync'ed. A write that fails (disk full, a kill, a signal) leaves the previous file intact and no
partial file under the final name; a failed write removes its temporary file (a SIGKILL cannot:
the next write of the same name overwrites it). Lightning's own writer goes through a temporary
file of fsspec's, which may live on another filesystem, where the final "rename" is a copy.

Loads (``safe_load``): ``torch.load(weights_only=True)``: tensors, containers and numbers only,
plus the few other types kit checkpoints hold (``safe_globals``); a file that asks to run
anything else while it is unpickled is refused with one line, before it runs. ``trust=True``
(``train.py --trust_checkpoint``) loads with full pickle, for a legacy file *you* wrote.
Unreadable files (empty, truncated, text) are one line too.

``KitCheckpointIO`` is the Lightning plugin that train.py installs: checkpoint saves and
``--ckpt_path`` loads go through the functions above; it remembers the last checkpoint it wrote
(for the resume command printed on a signal, callbacks/interrupt.py). Also here: the global RNG
states as a checkpoint stores them (``rng_state``, ``set_rng_state``) and ``check_fits``, the
one-line error for a checkpoint of another model.
"""
from __future__ import annotations

import os
import pickle
import random
import re

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written; the message is one line for the user."""


def safe_globals() -> list:
    """What a kit checkpoint may hold besides tensors, containers and numbers: numpy arrays (older
    checkpoints store numpy's RNG state as one) and the RPRM data's labelling rule (a dataclass of
    numbers, in an RPRM checkpoint's datamodule hyperparameters)."""
    from modules.vla_rl.pseudo_labels import PseudoLabeler

    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64)),
            getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct, PseudoLabeler]


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


class _File:
    """A file that remembers the OS error of a failed write: torch.save reports one as a
    RuntimeError of its zip writer ("unexpected pos ...")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def _atomic(path: str, write) -> None:
    """``write(file)`` into ``.<name>.partial`` beside ``path``, fsync, rename over ``path``."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial")
    stream = None
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            stream = _File(f)
            write(stream)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = err if isinstance(err, OSError) else getattr(stream, "error", None)
        if cause is not None:
            raise CheckpointError(f"{path}: could not write ({cause.strerror or cause}); the previous file, "
                                  "if any, is unchanged") from None
        raise
    _fsync_dir(directory)


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj, path)``, atomically (module docstring)."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def safe_load(path: str, key: str, trust: bool = False, map_location="cpu"):
    """``torch.load`` of a user-given file without running code from it. ``key`` names the setting
    the path came from (e.g. ``ckpt_path``) in the one-line errors."""
    where = f"{key}={path!r}"
    if not os.path.isfile(path):
        raise CheckpointError(f"{where}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{where}: the file is empty (not a checkpoint)")
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        if "Weights only load failed" in message:
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", message)
            refused = found.group(1) if found else "an object that is not a tensor"
            raise CheckpointError(f"{where}: refused to load: unpickling it would run {refused}, which is not "
                                  "a type a kit checkpoint holds; only if you trust the file, load it with "
                                  "--trust_checkpoint") from None
        raise CheckpointError(f"{where}: not a checkpoint (not written by torch.save: {message[:80]})") from None
    except Exception as err:  # noqa: BLE001  (truncated zip, text, ...: whatever the unpickler trips on)
        detail = " ".join(str(err).split())[:100]
        raise CheckpointError(f"{where}: not a readable checkpoint (truncated or not written by torch.save: "
                              f"{detail})") from None


def require_keys(state, keys: tuple[str, ...], where: str, what: str) -> None:
    """One line when a loaded file is not the kind of checkpoint the setting expects."""
    if not isinstance(state, dict) or any(k not in state for k in keys):
        have = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{where}: not {what} (expected the keys {list(keys)}; the file has {have})")


def rng_state() -> dict:
    """The global RNGs (torch, CUDA, numpy, python), as tensors and numbers only (so that a
    checkpoint holding them loads with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # older checkpoints: an array
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_fits(module: torch.nn.Module, state_dict: dict) -> None:
    """One line when a checkpoint's weights do not fit ``module`` (another model size, critic width,
    adapter set, ...), instead of Lightning's list of every mismatched tensor."""
    mine = module.state_dict()
    wrong = [k for k in state_dict
             if k in mine and tuple(getattr(state_dict[k], "shape", ())) != tuple(mine[k].shape)]
    missing = [k for k in mine if k not in state_dict]
    extra = [k for k in state_dict if k not in mine]
    if wrong:
        k = wrong[0]
        what = (f"{k} is {list(state_dict[k].shape)} in the checkpoint and {list(mine[k].shape)} in the configured "
                f"model ({len(wrong)} tensors differ)")
    elif missing or extra:
        what = (f"{len(missing)} of the model's tensors are not in the checkpoint (e.g. {missing[:1]}) and "
                f"{len(extra)} of its tensors are not in the model (e.g. {extra[:1]})")
    else:
        return
    raise CheckpointError(f"ckpt_path: the checkpoint does not fit the configured model: {what}; resume with the "
                          "model.* settings it was trained with (its run's config.yaml)")


class KitCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin with atomic writes and safe loads (module docstring)."""

    def __init__(self, trust: bool = False):
        self.trust = trust
        self.last_saved: tuple[str, int] | None = None  # (path, epoch) of the latest write

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_save(checkpoint, str(path))
        self.last_saved = (os.path.abspath(str(path)), int(checkpoint.get("epoch", -1)))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        state = safe_load(str(path), "ckpt_path", self.trust, map_location or "cpu")
        require_keys(state, ("state_dict", "loops"), f"ckpt_path={str(path)!r}", "a checkpoint of a train.py run")
        return state
