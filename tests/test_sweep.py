"""scripts/sweep.py: method specs (one or several ablation YAMLs, in order) become train.py commands."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import sweep  # noqa: E402


def test_method_with_several_yamls_keeps_their_order(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    seq, lora = "configs/ablations/seq_ft.yaml", "configs/ablations/lora.yaml"
    args, methods = sweep.parse_args(["--config", "configs/quickstart.yaml", "--method", "crl=",
                                      "--method", f"seq_ft_lora={seq},{lora}", "--seeds", "3",
                                      "--out", str(tmp_path)])
    assert methods == [("crl", []), ("seq_ft_lora", [seq, lora])]
    cmd = sweep.command(args, "seq_ft_lora", methods[1][1], 3)
    configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
    assert configs == ["configs/quickstart.yaml", seq, lora]
    assert cmd[cmd.index("--seed") + 1] == "3" and cmd[cmd.index("--trainer.logger.init_args.name") + 1] == "seq_ft_lora"


def test_missing_yaml_in_a_method_is_one_error(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        sweep.parse_args(["--config", "configs/quickstart.yaml",
                          "--method", "x=configs/ablations/seq_ft.yaml,configs/ablations/nope.yaml"])
    assert e.value.code != 0
    assert "configs/ablations/nope.yaml" in capsys.readouterr().err


def test_resume_goes_on_from_the_newest_checkpoint(tmp_path):
    """A run stopped during a task-end evaluation has task{k}_end.ckpt newer than last.ckpt (the
    iteration's last.ckpt comes after the evaluation): --resume takes it and does not train that
    iteration again; a half-written checkpoint never counts."""
    run_dir = tmp_path / "crl" / "seed0"
    assert sweep.newest_checkpoint(str(run_dir)) is None
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True)
    for age, name in ((30, "last.ckpt"), (20, "task0_end.ckpt"), (10, ".task1_end.ckpt.partial")):
        path = folder / name
        path.write_bytes(b"x")
        t = 1_000_000 - age
        os.utime(path, (t, t))
    assert sweep.newest_checkpoint(str(run_dir)) == str(folder / "task0_end.ckpt")
    os.utime(folder / "last.ckpt", (1_000_000, 1_000_000))
    assert sweep.newest_checkpoint(str(run_dir)) == str(folder / "last.ckpt")
