"""The GPU benchmarks (bench/openvla_gpu.py, bench/oft_gpu.py) on the CPU with tiny models: every
section runs and measures."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_oft_benchmark_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "oft.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "oft_gpu.py"), "--small", "--reps", "1",
                          "--train_reps", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FAILED" not in res.stdout + res.stderr
    r = json.loads(out.read_text())
    for b, row in r["acting"].items():
        # two views of 256 patches + text, then K x D placeholders and the stop token
        assert row["oft_prompt_len"] > 2 * 256 + 8 * 7 and row["token_prompt_len"] > 256
        assert all(row[k] > 0 and math.isfinite(row[k]) for k in ("oft_act", "oft_floor", "token_act"))
    assert set(r["update"]) == {"2", "4"} and all(u["samples_per_s"] > 0 for u in r["update"].values())
    assert r["crl_vs_ppo"]["crl"]["step_s"] > 0 and r["crl_vs_ppo"]["ppo"]["step_s"] > 0
    assert "| 4 |" in res.stdout  # the table


def test_openvla_benchmark_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "openvla.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "openvla_gpu.py"), "--small", "--reps", "1",
                          "--train_reps", "1", "--modes", "generate", "cuda_graph", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FAILED" not in res.stdout + res.stderr
    r = json.loads(out.read_text())
    for row in r["acting"].values():
        assert all(row[k] > 0 for k in ("prefill", "generate", "act_cuda_graph"))
    # 2 micro-batches x checkpointing off / on x PEFT's LoRA forward / the fused one
    assert all(u["samples_per_s"] > 0 for u in r["update"].values()) and len(r["update"]) == 8
    assert {"mb2_ckpt0_fused0", "mb2_ckpt0_fused1", "mb4_ckpt1_fused1"} <= set(r["update"])
    assert "| 4 | on | on |" in res.stdout  # the update table's fused column
    assert r["crl_vs_ppo"]["crl"]["step_s"] > 0 and r["crl_vs_ppo"]["ppo"]["step_s"] > 0


def test_the_vla_rl_job_runs_on_one_gpu_with_its_rprm_on(tmp_path):
    """bench/crl_job.py's ``vla_rl`` job: configs/vla_rl.yaml on one device, LIBERO-Goal, and an RPRM
    checkpoint of the adapters and head (the frozen VLM referenced) that the reward shaping built
    from the same config loads (its base checked against the record)."""
    import argparse

    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import crl_job
    from random_openvla_checkpoint import write

    from datamodules.reward_shaping import RewardShaping

    ckpt = write(str(tmp_path / "openvla"), "tiny", "cpu")
    args = argparse.Namespace(ckpt=ckpt, device="cpu", variant="shipped",
                              set=["data.reward_shaping.scale=0.5", "data.reward_shaping.rprm.init_args.lora.r=4"],
                              runs=str(tmp_path), tag="", checkpoints=False, iterations=2, eval_episodes=2,
                              eval_steps=4, num_envs=2, tasks=[8, 1], render=None, frames=16, minibatch=8)
    cfg = OmegaConf.load(crl_job.config(args, "vla_rl"))
    assert cfg.trainer.devices == 1 and cfg.trainer.strategy == "auto" and cfg.data.joint
    assert cfg.data.stream[0].suite == "libero_goal" and list(cfg.data.stream[0].task_ids) == [8, 1]
    shaping = cfg.data.reward_shaping
    assert shaping.scale == 0.5 and shaping.rprm.init_args.backbone.init_args.pretrained == ckpt
    assert shaping.rprm.init_args.lora.r == 4  # the checkpoint is written for the RPRM as overridden
    saved = torch.load(shaping.checkpoint, weights_only=False)
    assert saved["state_dict"] and all(".lora_" in k or k.startswith("rprm.head.") for k in saved["state_dict"])
    assert len(saved["frozen_base"]["tensors"]) > 20 and saved["frozen_base"]["source"] == ckpt
    assert os.path.basename(shaping.checkpoint).startswith("rprm_random_")
    built = RewardShaping(OmegaConf.to_container(shaping))  # builds the RPRM and loads the checkpoint
    assert built.active and built.checkpoint == shaping.checkpoint
    assert torch.equal(built.rprm.head[1].weight, saved["state_dict"]["rprm.head.1.weight"])
    lora_a = next(v for k, v in saved["state_dict"].items() if ".lora_A." in k)
    assert lora_a.shape[0] == 4
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(
        str(tmp_path), "vla_rl_shipped.yaml"), "--print_config"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "reward_shaping" in res.stdout and "micro_batch_size: 8" in res.stdout
