"""train.py's checks of a run's configuration, before anything is built, each failing with one
line that names the key and the value (train.py prints ``error: <line>`` and exits with 2).

Also the two command-line fixes train.py applies: a ``null`` given on the command line for a
setting nested two class levels deep (``--model.policy.init_args.backbone.init_args.checkpoint
null``) reaches the class as null (jsonargparse alone passes the string 'None'), and a failed
start removes the empty ``version_N`` folder it created, so that it does not look like a run.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile

import yaml

NULLS = ("null", "Null", "NULL", "~")


def check_config_files(argv: list[str]) -> None:
    """Every ``--config FILE`` holds a YAML mapping (jsonargparse says only "Unexpected config:"
    for an empty one)."""
    for key, path in _options(argv, "--config"):
        if not os.path.isfile(path):
            continue  # jsonargparse's own error names the missing file
        with open(path) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ValueError(f"{key}={path!r}: not valid YAML ({' '.join(str(err).split())[:120]})") from None
        if data is None:
            raise ValueError(f"{key}={path!r}: the file is empty (expected a YAML mapping of trainer, model, data)")
        if not isinstance(data, dict):
            raise ValueError(f"{key}={path!r}: expected a YAML mapping of trainer, model, data, not a "
                             f"{type(data).__name__}")


def nested_nulls_as_config(argv: list[str], directory: str) -> list[str]:
    """``--a.init_args.b.init_args.c null`` -> ``--config <file with a: {init_args: {b: ...: null}}>``
    at the same place in the command line (a YAML null reaches the class as None)."""
    out, i, n = [], 0, 0
    while i < len(argv):
        arg = argv[i]
        key, value, step = None, None, 1
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif arg.startswith("--") and i + 1 < len(argv):
            key, value, step = arg[2:], argv[i + 1], 2
        if key is not None and value in NULLS and key.count(".init_args.") >= 2:
            tree = None
            for part in reversed(key.split(".")):
                tree = {part: tree}
            n += 1
            path = os.path.join(directory, f"null{n}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(tree, f)
            out += ["--config", path]
        else:
            out += argv[i:i + step]
        i += step
    return out


def check_finite(config: dict, prefix: str = "") -> None:
    """No NaN or infinite number anywhere in the configuration (a NaN coefficient passes every
    ``x < 0`` check and fails minutes later, inside the loss)."""
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(k, int) else (f"{prefix}.{k}" if prefix else str(k))
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{key}={v!r}: must be a finite number")
        if isinstance(v, (dict, list, tuple)):
            check_finite(v, key)


def check_devices(devices) -> None:
    """Lightning's own errors for a bad ``trainer.devices`` are TypeErrors with a traceback."""
    ok = (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)) \
        or (isinstance(devices, str) and (devices == "auto" or re.fullmatch(r"-1|[1-9]\d*|\d+(,\d+)*,?", devices))) \
        or (isinstance(devices, (list, tuple)) and devices
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices))
    if not ok:
        raise ValueError(f"trainer.devices={devices!r}: expected a number of devices >= 1, -1 (all), 'auto', or a "
                         "list of device indices")


def check_writable(key: str, path: str) -> None:
    """``path`` is (or can be made) a directory this process can write into."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{key}={path!r}: not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{key}={path!r}: cannot write there ({err.strerror or err})") from None


def check_output_dirs(trainer_config: dict) -> None:
    """The loggers' ``save_dir`` and ``trainer.default_root_dir``: writable directories."""
    loggers = trainer_config.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    for i, logger in enumerate(loggers):
        if isinstance(logger, dict) and (logger.get("init_args") or {}).get("save_dir") is not None:
            where = "trainer.logger" + (f"[{i}]" if len(loggers) > 1 else "")
            check_writable(f"{where}.init_args.save_dir", str(logger["init_args"]["save_dir"]))
    if trainer_config.get("default_root_dir") is not None:
        check_writable("trainer.default_root_dir", str(trainer_config["default_root_dir"]))


RUN_LEFTOVERS = re.compile(r"config\.yaml|hparams\.yaml|events\.out\.tfevents\..*")


def remove_failed_run(log_dir: str | None) -> None:
    """Remove a run folder that a failed start left with nothing but its config and empty
    TensorBoard files (anything else, e.g. a checkpoint or metrics.json, keeps it)."""
    if not log_dir or not os.path.isdir(log_dir):
        return
    for root, _, files in os.walk(log_dir):
        if any(not RUN_LEFTOVERS.fullmatch(f) for f in files):
            return
    shutil.rmtree(log_dir, ignore_errors=True)


def _options(argv: list[str], name: str):
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            yield name, argv[i + 1]
        elif arg.startswith(name + "="):
            yield name, arg.split("=", 1)[1]
