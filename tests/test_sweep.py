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


@pytest.mark.slow
def test_a_branched_seq_ft_run_is_the_seq_ft_run_from_scratch(tmp_path):
    """--branch seq_ft=crl: Seq-FT started from the CRL run's task0_trained.ckpt (TaskSwitch
    branch_points: saved when task 0's training is done, before CRL's anchor freeze) and the
    outcomes of the CRL run's evaluation after task 0 (the same policy: not played again) ends with
    the metrics and weights of the Seq-FT run from scratch, bit for bit."""
    import json

    import torch
    from omegaconf import OmegaConf

    from conftest import run_train, small_config

    def config(name, anchor):
        path = small_config(tmp_path, name, iterations=2, tasks=2, eval_episodes=2, anchor=anchor)
        cfg = OmegaConf.load(path)
        cfg.trainer.logger.init_args.version = "seed0"
        switch = next(c for c in cfg.trainer.callbacks if c.class_path.endswith("TaskSwitch"))
        switch.init_args.branch_points = True
        OmegaConf.save(cfg, path)
        return path, str(tmp_path / "runs" / name / "seed0")

    (crl, crl_dir), (scratch, scratch_dir), (branched, branched_dir) = (
        config("crl", True), config("seq_ft", False), config("seq_ft_branched", False))
    for path in (crl, scratch):
        res = run_train("--config", path, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
    assert sweep.first_task_done(crl_dir) and not sweep.first_task_done(branched_dir)
    ckpt = sweep.branch(crl_dir, branched_dir)
    res = run_train("--config", branched, "--ckpt_path", ckpt, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "after_task0: 4 episodes already played (resumed)" in res.stdout + res.stderr
    for file in ("metrics.json", "metrics_greedy.json"):
        a, b = (json.load(open(os.path.join(d, file))) for d in (scratch_dir, branched_dir))
        assert a["R"] == b["R"] and a["curves"] == b["curves"] and a["complete"] and b["complete"]
    assert json.load(open(os.path.join(crl_dir, "metrics.json")))["R"][0] == a["R"][0]  # the shared task
    weights = [torch.load(os.path.join(d, "checkpoints", "last.ckpt"), weights_only=False)["state_dict"]
               for d in (scratch_dir, branched_dir)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    crl_last = torch.load(os.path.join(crl_dir, "checkpoints", "last.ckpt"), weights_only=False)["state_dict"]
    assert not all(torch.equal(crl_last[k], weights[0][k]) for k in weights[0])  # CRL's task 1 differs


def test_branch_arguments_are_checked(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = ["--config", "configs/quickstart.yaml", "--method", "crl=", "--method", "seq_ft=configs/ablations/seq_ft.yaml"]
    args, _ = sweep.parse_args(base + ["--branch", "seq_ft=crl"])
    assert args.branches == {"seq_ft": "crl"}
    for bad in ("seq_ft=nope", "seq_ft=seq_ft", "seq_ft"):
        with pytest.raises(SystemExit):
            sweep.parse_args(base + ["--branch", bad])
        assert "--branch" in capsys.readouterr().err


def test_pack_runs_moves_each_runs_records_and_only_the_checkpoint_resume_needs(tmp_path, monkeypatch):
    import tarfile

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import pack_runs

    monkeypatch.chdir(tmp_path)
    for run, newest in (("sweep/crl/seed0", "task1_end.ckpt"), ("sweep/lwf/seed1", "last.ckpt")):
        os.makedirs(f"{run}/checkpoints")
        os.makedirs(f"{run}/eval_episodes")
        for i, name in enumerate(sorted({"last.ckpt", "task0_end.ckpt", "task1_end.ckpt"} - {newest}) + [newest]):
            with open(f"{run}/checkpoints/{name}", "wb") as f:
                f.write(os.urandom(300_000))
            os.utime(f"{run}/checkpoints/{name}", (1000 + i, 1000 + i))  # the last one written is the newest
        for name in ("metrics.json", "eval_episodes/after_task0.rank0.json", "events.out.tfevents.1"):
            with open(f"{run}/{name}", "w") as f:
                f.write("{}")
    parts = pack_runs.pack("sweep", "runs.tgz", max_mib=0.5)  # one run per part
    assert parts == ["runs.0.tgz", "runs.1.tgz"]
    names = set()
    for part in parts:
        with tarfile.open(part) as tar:
            names |= set(tar.getnames())
    assert {n for n in names if n.endswith(".ckpt")} == {"sweep/crl/seed0/checkpoints/task1_end.ckpt",
                                                          "sweep/lwf/seed1/checkpoints/last.ckpt"}
    assert "sweep/lwf/seed1/eval_episodes/after_task0.rank0.json" in names and "sweep/crl/seed0/metrics.json" in names
    with tarfile.open(parts[0]) as tar:  # the checkpoint keeps its time: --resume picks it as the newest again
        assert tar.getmember("sweep/crl/seed0/checkpoints/task1_end.ckpt").mtime == 1002
