"""A 7B OpenVLA-OFT-shaped policy on one GPU: acting against the token OpenVLA in the same run,
and the LoRA PPO update on action-chunk samples (CRL vs PPO memory). Random weights (nothing is
downloaded); bf16.

Models: ``OFTOpenVLABackbone`` and ``OpenVLABackbone`` from ``config:`` with OpenVLA-7B's shapes
(bench/openvla_gpu.py's ``FULL``), each built directly on the GPU in bf16, one at a time.
The OFT policy reads OFT's LIBERO inputs: the third-person and wrist images (2 x 256 patches),
the 8-D proprio state as one token, K=8 x D=7 action placeholders; one forward gives a chunk of 8
actions, i.e. 8 env steps per observation.

(a) acting at batch 16 / 64, env steps/s:
    * ``oft_act``: ``OFTPolicy.act`` (one bidirectional forward, Laplace sample), batch x 8 env
      steps per call;
    * ``oft_floor``: the same backbone forward over the same sequence, without the action
      placeholders' embeddings, the head or sampling (what one forward of this length costs);
    * ``token_act``: the token OpenVLA's ``act`` (``decoding: cuda_graph``: one prefill of a
      one-image prompt + 6 decode steps for 7 action tokens), batch env steps per call.
(b) LoRA r=32 (all-linear) PPO update on chunks: ``evaluate`` + critic + clipped PPO loss +
    backward + AdamW step, samples/s and peak memory at each micro-batch (no checkpointing).
(c) one CRL step (the old adapter's Laplace parameters for the anchors, one evaluate over current
    + anchor samples, anchor critic, the closed-form Laplace KL + anchor value terms) vs the PPO
    step, peak memory: with the PPO step's current samples plus half as many anchors (1.5x the
    rows per forward), and at the same rows per forward (what ``model.micro_batch_size`` holds:
    current and anchor rows together).

Usage: python bench/oft_gpu.py [--out oft.json]      (GPU)
       python bench/oft_gpu.py --small                (CPU smoke test of the script)
Medians over ``--reps`` repetitions after a warm-up; a table is printed last.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tensordict import TensorDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from openvla_gpu import (INSTRUCTIONS, T0, batch_inputs, build, crl_step, free, log, median_time,  # noqa: E402
                         ppo_step, run_sections, timed_step, training_parts)

from modules.critics import frozen_copy  # noqa: E402
from modules.policy import OpenVLABackbone, TokenVLAPolicy  # noqa: E402
from modules.policy.backbone import positions_from_mask  # noqa: E402
from modules.policy.oft_vla import OFTPolicy  # noqa: E402
from modules.policy.openvla.oft_backbone import OFTOpenVLABackbone  # noqa: E402

K, D = 8, 7  # OFT on LIBERO: 8 actions of 7 dimensions per chunk
LORA = {"r": 32, "alpha": 64, "target_modules": "all-linear", "compute_dtype": "backbone"}


def oft_inputs(policy, n, dev, seed=0):
    """OFT's LIBERO observation for ``n`` envs: both cameras (uint8, 224 px) and the 8-D state."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g) for _ in range(2)]
    obs = TensorDict({"image": views[0], "wrist_image": views[1], "state": torch.randn(n, 8, generator=g)},
                     batch_size=[n]).to(dev)
    return obs, policy.encode([INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(n)])


def oft_floor_fn(policy, obs, prompts):
    """The backbone's forward over OFT's sequence (prompt, K x D placeholders, stop token) alone."""
    b = prompts.input_ids.shape[0]
    ids = torch.cat([prompts.input_ids, prompts.input_ids.new_full((b, K * D + 1), policy.stop_id)], 1)
    keys = torch.cat([prompts.attention_mask, prompts.attention_mask.new_ones(b, K * D + 1)], 1)

    def run():
        with torch.no_grad():
            return policy.backbone(ids, keys, policy._pixel_values(obs), positions_from_mask(keys))
    return run


def bench_acting(args, dev, dtype, res):
    rows = res.setdefault("acting", {})
    oft = OFTPolicy(build(args, dev, dtype, OFTOpenVLABackbone, num_images=2, proprio=True),
                    chunk_size=K, action_dim=D).to(dev)
    oft.eval()
    for b in args.batches:
        obs, prompts = oft_inputs(oft, b, dev, seed=b)
        row = rows[b] = {"oft_prompt_len": int(prompts.input_ids.shape[1]) + K * D + 1}
        row["oft_act"] = median_time(lambda: oft.act(obs, prompts), dev, args.reps)
        row["oft_floor"] = median_time(oft_floor_fn(oft, obs, prompts), dev, args.reps)
        log(f"batch {b}: {row}")
    del oft
    free(dev)
    token = TokenVLAPolicy(build(args, dev, dtype), action_tokens=7, action_bins=256, decoding="cuda_graph").to(dev)
    token.eval()
    for b in args.batches:
        images, prompts = batch_inputs(token, b, dev, seed=b)
        token.act(images, prompts)  # capture outside the timing
        rows[b]["token_prompt_len"] = int(prompts.input_ids.shape[1])
        rows[b]["token_act"] = median_time(lambda: token.act(images, prompts), dev, args.reps)
        token.release_decode_cache()
        log(f"batch {b}: {rows[b]}")
    del token
    free(dev)


def bench_update(args, dev, dtype, res):
    policy = OFTPolicy(build(args, dev, dtype, OFTOpenVLABackbone, num_images=2, proprio=True),
                       chunk_size=K, action_dim=D, lora=dict(LORA)).to(dev)
    critic, opt = training_parts(policy, dev, res)
    rows = res.setdefault("update", {})
    for mb in args.micro:
        if time.perf_counter() - T0 > args.budget_s * 0.8:
            log(f"update: skipping micro-batch {mb} (time budget)")
            continue
        obs, prompts = oft_inputs(policy, mb, dev, seed=mb)
        chunks = torch.rand(mb, K, D, device=dev) * 2 - 1
        rows[mb] = timed_step(lambda: ppo_step(policy, critic, opt, obs, prompts, chunks), dev, args.train_reps, opt,
                              samples=mb)
        log(f"update micro-batch {mb}: {rows[mb]}")
    mb = args.crl_micro
    n_anchor = mb // 2  # data.anchor_fraction 0.5 (the kit's default)
    old, anchor_critic = policy.snapshot(), frozen_copy(critic)
    obs, prompts = oft_inputs(policy, mb, dev, seed=99)
    chunks = torch.rand(mb, K, D, device=dev) * 2 - 1
    # the kit's micro_batch_size counts current + anchor rows: at the same rows per forward as PPO,
    # a slice holds ~2/3 current and ~1/3 anchor rows (anchor_fraction 0.5)
    n_rows_anchor = mb // 3
    obs_r, prompts_r = oft_inputs(policy, mb - n_rows_anchor, dev, seed=98)
    chunks_r = chunks[:mb - n_rows_anchor]
    out = res.setdefault("crl_vs_ppo", {"micro_batch": mb, "anchors": n_anchor, "same_rows_anchors": n_rows_anchor})
    for name, fn in (("ppo", lambda: ppo_step(policy, critic, opt, obs, prompts, chunks)),
                     ("crl", lambda: crl_step(policy, old, critic, anchor_critic, opt, obs, prompts, chunks, n_anchor)),
                     ("crl_same_rows", lambda: crl_step(policy, old, critic, anchor_critic, opt, obs_r, prompts_r,
                                                        chunks_r, n_rows_anchor))):
        out[name] = timed_step(fn, dev, args.train_reps, opt)
        log(f"{name} at micro-batch {mb}: {out[name]}")


def table(res) -> str:
    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    lines = ["| batch | OFT act | OFT floor | act / floor | OFT env steps/s | token act | token env steps/s "
             "| OFT / token env steps/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b, r in res.get("acting", {}).items():
        b = int(b)
        oft, floor, token = r.get("oft_act"), r.get("oft_floor"), r.get("token_act")
        oft_rate = b * K / oft if oft else None
        token_rate = b / token if token else None
        lines.append(f"| {b} | {f(oft)} s | {f(floor)} s | {f(oft / floor if oft and floor else None, '.2f')}x | "
                     f"{f(oft_rate, '.1f')} | {f(token)} s | {f(token_rate, '.1f')} | "
                     f"{f(oft_rate / token_rate if oft_rate and token_rate else None, '.1f')}x |")
    lines += ["", "| micro-batch | samples/s | step | peak memory |", "| --- | --- | --- | --- |"]
    for mb, r in res.get("update", {}).items():
        peak = r["peak_gib"] if isinstance(r["peak_gib"], str) else f"{r['peak_gib']:.1f} GiB"
        lines.append(f"| {mb} | {f(r['samples_per_s'], '.1f')} | {f(r['step_s'])} s | {peak} |")
    c = res.get("crl_vs_ppo", {})
    if c.get("ppo") and c.get("crl") and not isinstance(c["ppo"]["peak_gib"], str) \
            and not isinstance(c["crl"]["peak_gib"], str):
        lines.append(f"\nCRL vs PPO at micro-batch {c['micro_batch']} ({c['anchors']} anchors): step "
                     f"{f(c['crl']['step_s'])} vs {f(c['ppo']['step_s'])} s, peak {c['crl']['peak_gib']:.1f} vs "
                     f"{c['ppo']['peak_gib']:.1f} GiB ({c['crl']['peak_gib'] / c['ppo']['peak_gib']:.2f}x)")
        r = c.get("crl_same_rows")
        if r and not isinstance(r["peak_gib"], str):
            m, na = c["micro_batch"], c["same_rows_anchors"]
            lines.append(f"CRL at {m} rows per forward ({m - na} current + {na} anchors, the kit's micro_batch_size): "
                         f"step {f(r['step_s'])} s, peak {r['peak_gib']:.1f} GiB "
                         f"({r['peak_gib'] / c['ppo']['peak_gib']:.2f}x PPO)")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny models on the CPU (checks the script)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="acting batches (envs)")
    ap.add_argument("--micro", type=int, nargs="+", default=None, help="update micro-batches")
    ap.add_argument("--crl_micro", type=int, default=None, help="micro-batch of the CRL vs PPO step")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train_reps", type=int, default=3)
    ap.add_argument("--budget_s", type=float, default=420.0, help="update micro-batches are skipped past this")
    ap.add_argument("--skip", nargs="*", default=[], choices=["acting", "update"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    args.batches = args.batches or ([2, 4] if args.small else [16, 64])
    args.micro = args.micro or ([2, 4] if args.small else [8, 16])
    args.crl_micro = args.crl_micro or (4 if args.small else 8)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    import transformers

    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "args": vars(args)}
    log(res)
    run_sections({"acting": bench_acting, "update": bench_update}, args, dev, res, args, dev, dtype, res)
    print(table(res), flush=True)


if __name__ == "__main__":
    main()
