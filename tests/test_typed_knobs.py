"""Typed knobs (dataclasses: ``model.policy.init_args.lora``, ``data.curriculum``): the parser
validates them, and a wrong key or value is one line naming the full key (parsed in-process)."""
import contextlib
import io
import os

import pytest
import torch
from conftest import ROOT, print_config


def parse_error(*args) -> tuple[int, str]:
    import train

    threads, err = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = train.main([*args, "--print_config"])
    except SystemExit as exit_:
        code = exit_.code
    finally:
        torch.set_num_threads(threads)
    return code, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""


CRL = os.path.join(ROOT, "configs", "crl.yaml")
SMOKE = os.path.join(ROOT, "configs", "vla_rl_smoke.yaml")


@pytest.mark.parametrize("args, line", [
    ((CRL, "--model.policy.init_args.lora.rank=8"), "error: model.policy.init_args.lora.rank: unknown key"),
    ((CRL, "--model.policy.init_args.lora.r=x"), "error: model.policy.init_args.lora.r=x: expected int"),
    ((SMOKE, "--data.curriculum.temp=1"), "error: data.curriculum.temp: unknown key"),
    ((SMOKE, "--data.curriculum.window=w"), "error: data.curriculum.window=w: expected int"),
])
def test_a_bad_typed_knob_is_one_line_naming_it(args, line):
    code, last = parse_error("--config", *args)
    assert code == 2 and last == line


def test_typed_knobs_print_every_field():
    out = print_config("--config", CRL)
    assert "lora:\n        r: 32\n        alpha: 16\n        dropout: 0.0\n        target_modules: all-linear" in out
    out = print_config("--config", SMOKE)
    assert "curriculum:\n    window: " in out and "    floor: " in out
