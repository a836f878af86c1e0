"""``train.py test``: a checkpoint's score on every task of the stream, without training."""
import glob
import json
import os

import pytest
from conftest import ROOT, run_train, small_config
from helpers.videos import read_mp4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quickstart shrunk to 2 tasks x 1 iteration, with 1 video per task and evaluation."""
    d = tmp_path_factory.mktemp("trained")
    cfg = small_config(d, "qs", iterations=1, tasks=2, videos=1)
    res = run_train("--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    (log_dir,) = glob.glob(str(d / "runs" / "qs" / "version_*"))
    return d, cfg, log_dir


@pytest.mark.slow
@pytest.mark.parametrize("ckpt, row", [("task0_end.ckpt", 0), ("last.ckpt", 1)])
def test_a_kit_checkpoint_scores_what_training_measured_at_that_point(trained, ckpt, row):
    """The score of task k's end checkpoint is row k of the training run's R, exactly (the
    evaluation episodes are seeded by task and episode), for the sampled and the greedy
    evaluation; each writes evaluation<_tag>.json and one video per task."""
    d, cfg, log_dir = trained
    path = os.path.join(log_dir, "checkpoints", ckpt)
    res = run_train("test", "--config", cfg, "--ckpt_path", path, "--trainer.logger.init_args.name", f"score{row}")
    assert res.returncode == 0, res.stderr[-3000:]
    (out,) = glob.glob(str(d / "runs" / f"score{row}" / "version_*"))
    for tag in ("", "_greedy"):
        trained_R = json.load(open(os.path.join(log_dir, f"metrics{tag}.json")))["R"]
        scored = json.load(open(os.path.join(out, f"evaluation{tag}.json")))
        assert scored["success"] == trained_R[row]
        assert scored["checkpoint"] == path and scored["episodes_per_task"] == 4
        assert scored["tasks"] == ["GoToObjectRoom:red ball", "GoToObjectRoom:green key"]
        assert abs(scored["mean_success"] - sum(scored["success"]) / 2) < 1e-12
        for task in (0, 1):
            frames = read_mp4(os.path.join(out, f"videos{tag}", "evaluation", f"task{task}_ep0.mp4"))
            assert len(frames) >= 2 and frames[0].shape == (56, 56, 3)
    lines = res.stdout.splitlines()
    first = json.load(open(os.path.join(out, "evaluation.json")))["success"][0]
    assert any(line.split() == ["task", "0", "GoToObjectRoom:red", "ball", f"{first:.3f}"] for line in lines)
    assert not os.path.exists(os.path.join(out, "metrics.json"))  # nothing trained, no R


def test_a_missing_checkpoint_is_one_clear_line(tmp_path):
    res = run_train("test", "--config", "configs/quickstart.yaml", "--ckpt_path", str(tmp_path / "nope.ckpt"),
                    timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"error: ckpt_path='{tmp_path / 'nope.ckpt'}': no such checkpoint file"


@pytest.mark.slow
def test_a_bare_openvla_checkpoint_folder_scores_on_libero(tmp_path):
    """An OpenVLA checkpoint folder (OpenVLA's on-disk format, tiny) loaded by the policy config,
    scored on a LIBERO task from its fixed initial states: no kit checkpoint, no training."""
    from helpers.openvla_checkpoint import write_checkpoint

    folder = tmp_path / "openvla-tiny"
    folder.mkdir()
    write_checkpoint(str(folder))
    overlay = tmp_path / "openvla.yaml"
    overlay.write_text(
        "model:\n  policy:\n    init_args:\n"
        f"      norm_stats: {folder}\n      unnorm_key: libero_goal_no_noops\n"
        "      backbone:\n        class_path: modules.policy.OpenVLABackbone\n"
        f"        init_args: {{pretrained: {folder}, dtype: float32}}\n"
        "data:\n  stream:\n    - {env: libero, suite: libero_goal, task_id: 8, max_steps: 12, render_size: 128, image_size: 64}\n")
    res = run_train("test", "--config", os.path.join(ROOT, "configs", "libero_smoke.yaml"), "--config", str(overlay),
                    "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    (out,) = glob.glob(str(tmp_path / "runs" / "libero_smoke" / "version_*"))
    scored = json.load(open(os.path.join(out, "evaluation.json")))
    assert scored["checkpoint"] is None and scored["episodes_per_task"] == 2 and scored["greedy"] is True
    assert len(scored["tasks"]) == 1 and scored["tasks"][0].startswith("libero_goal:8")
    assert scored["success"][0] in (0.0, 0.5, 1.0)
    frames = read_mp4(os.path.join(out, "videos", "evaluation", "task0_ep0.mp4"))
    assert len(frames) >= 2 and frames[0].shape == (64, 64, 3)
