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
    assert all(u["samples_per_s"] > 0 for u in r["update"].values()) and len(r["update"]) == 4
    assert r["crl_vs_ppo"]["crl"]["step_s"] > 0 and r["crl_vs_ppo"]["ppo"]["step_s"] > 0
