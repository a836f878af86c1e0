"""A 7B OpenVLA-shaped policy on one GPU: acting throughput, LoRA PPO update throughput and
memory, CRL vs PPO memory. Random weights (nothing is downloaded); bf16.

Model: the kit's OpenVLABackbone from ``config:`` with Llama-2-7B's text shape (4096 x 32 layers,
32 heads, MLP 11008, vocab 32064), the real DINOv2-L/14-reg4 + SigLIP-So400m/14 towers at 224 px
(256 patches), built directly on the GPU in bf16.

(a) acting, env steps/s (= batch / seconds per act) at batch 16/64/128:
    * ``generate``: plain transformers ``LlamaForCausalLM.generate`` on the same weights over the
      full vocabulary, 7 new tokens, from the same prefix embeddings (vision + projector timed in);
    * the kit's ``act()`` with ``decoding`` dynamic / static / cuda_graph (7 action tokens);
    * the floor: a prefill forward at that batch (timed) + 7 weight reads, one weight read =
      the LLM's decoder + LM-head bytes / the device-to-device copy bandwidth measured here
      (also shown: a captured single-token decode step at batch 1, measured).
(b) LoRA r=32 (all-linear) PPO update: teacher-forced evaluate + critic + clipped PPO loss +
    backward + AdamW step, samples/s and peak memory, micro-batch 8/16/32, checkpointing off/on.
(c) peak memory of one CRL step (old-adapter forward for the KL targets, evaluate on current +
    anchor samples, anchor critic, KL + anchor value terms) vs the plain PPO step, same micro-batch.

Usage: python bench/openvla_gpu.py [--out results.json]      (GPU)
       python bench/openvla_gpu.py --small                     (CPU smoke test of the script)
Medians over ``--reps`` repetitions after a warm-up; a table is printed last.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modules.critics import GoalConditionedCritic, frozen_copy  # noqa: E402
from modules.losses import crl_loss  # noqa: E402
from modules.policy import OpenVLABackbone, TokenVLAPolicy  # noqa: E402
from modules.policy.lora import AdapterPolicy, set_fused_lora, snapshot_adapter  # noqa: E402
from modules.policy.token_vla import set_gradient_checkpointing  # noqa: E402

INSTRUCTIONS = ["put the bowl on the plate", "open the middle drawer of the cabinet",
                "put the cream cheese in the bowl", "push the plate to the front of the stove"]
FULL = {"towers": "openvla", "hidden_size": 4096, "layers": 32, "heads": 32, "intermediate_size": 11008,
        "words": ["put the on in of to top"]}
SMALL = {"towers": "tiny", "image_size": 224, "patch_size": 14, "vision_hidden_size": 32, "vision_depth": 2,
         "hidden_size": 64, "layers": 2, "heads": 2, "words": ["put the on in of to top"]}
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, dev, reps, warmup=1):
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def peak_gib(dev):
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def batch_inputs(policy, n, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g).to(dev)
    return images, policy.encode([INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(n)])


def copy_bandwidth(dev, gib=4):
    """Device-to-device copy, bytes read + written per second."""
    n = gib * 2**30 // 2
    src, dst = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_(), torch.empty(n, dtype=torch.bfloat16, device=dev)
    t = median_time(lambda: dst.copy_(src), dev, reps=10, warmup=2)
    del src, dst
    return 2 * n * 2 / t


def build(args, dev, dtype, cls=OpenVLABackbone, **kwargs):
    """A random ``cls`` (an OpenVLA backbone) of ``FULL``'s (``--small``: ``SMALL``'s) shape."""
    cfg = SMALL if args.small else FULL
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 directly on the device: no fp32 copy, fast init
    try:
        with torch.device(dev):
            backbone = cls(config=dict(cfg), dtype="bfloat16" if dtype == torch.bfloat16 else "float32", **kwargs)
    finally:
        torch.set_default_dtype(old)
    return backbone


def generate_fn(backbone, images, prompts):
    """Plain transformers generate over the full vocabulary on the same weights (7 new tokens)."""
    from transformers import LlamaForCausalLM

    vlm = backbone.vlm
    lm = vlm.language_model
    if not hasattr(backbone, "_causal_lm"):
        with torch.device("meta"):
            causal = LlamaForCausalLM(lm.config)
        causal.model, causal.lm_head = lm, backbone.model.get_output_embeddings()
        causal.eval()
        backbone._causal_lm = causal
    causal = backbone._causal_lm

    def run():
        with torch.no_grad():
            embeds = vlm.embed(prompts.input_ids, backbone.preprocess(images))
            return causal.generate(inputs_embeds=embeds, attention_mask=prompts.attention_mask, max_new_tokens=7,
                                   min_new_tokens=7, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                   pad_token_id=32000)
    return run


def prefill_fn(policy, images, prompts):
    from modules.policy.backbone import positions_from_mask

    def run():
        with torch.no_grad():
            pv = policy.backbone.preprocess(images)
            return policy.backbone(prompts.input_ids, prompts.attention_mask, pv,
                                   positions_from_mask(prompts.attention_mask), use_cache=True)
    return run


# -- (a) acting ---------------------------------------------------------------------------------
def bench_acting(args, backbone, dev, res):
    policies = {m: TokenVLAPolicy(backbone, action_tokens=7, action_bins=256, decoding=m.split("+")[0],
                                  compile_decode=m.endswith("+compile")).to(dev)
                for m in args.modes if m not in ("generate",)}
    if "cuda_graph" not in policies:
        policies["cuda_graph"] = TokenVLAPolicy(backbone, action_tokens=7, action_bins=256,
                                                decoding="cuda_graph").to(dev)
    lm = backbone.vlm.language_model
    head = backbone.model.get_output_embeddings().weight
    weight_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n) \
        + head.numel() * head.element_size()
    bw = copy_bandwidth(dev) if dev.type == "cuda" else float("nan")
    read_s = weight_bytes / bw
    res["weight_read"] = {"bytes": weight_bytes, "copy_bandwidth_Bps": bw, "read_s": read_s}
    log(f"LLM decoder+head weights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bw / 1e12:.2f} TB/s "
        f"-> one weight read {read_s * 1e3:.2f} ms")
    # a captured single-token decode step at batch 1: a measured weight read (+ launch of one graph)
    g = policies["cuda_graph"]
    images, prompts = batch_inputs(g, 1, dev)
    g.act(images, prompts)
    dec = g._decoder
    shape = next(reversed(dec._shapes.values()))  # the shape the act above used
    if dev.type == "cuda":
        res["weight_read"]["graph_step_b1_s"] = median_time(lambda: dec._replay_or_capture(lm, shape), dev, reps=20)
        log(f"captured 1-token decode step at batch 1: {res['weight_read']['graph_step_b1_s'] * 1e3:.2f} ms")
    g.release_decode_cache()

    # correctness at this size (bf16): act vs the teacher-forced evaluate, per decoding mode
    images, prompts = batch_inputs(g, args.batches[0], dev, seed=1)  # the first timed batch: no extra compile
    for m, p in policies.items():
        torch.manual_seed(0)
        t = time.perf_counter()
        a = p.act(images, prompts)
        sync(dev)
        res.setdefault("first_act_s", {})[m] = time.perf_counter() - t  # capture / compile included
        with torch.no_grad():  # no LoRA here: the base weights require grad
            e = p.evaluate(images, prompts, a.tokens)
        res.setdefault("act_vs_evaluate_max_abs_logprob", {})[m] = (a.log_prob - e.log_prob).abs().max().item()
        p.release_decode_cache()
    log("act vs evaluate |d log_prob| max:", res["act_vs_evaluate_max_abs_logprob"])
    log(f"first act (batch {args.batches[0]}, graph capture / compilation included):", res["first_act_s"])

    rows = res.setdefault("acting", {})
    for b in args.batches:
        if time.perf_counter() - T0 > args.budget_s * 0.45:
            log(f"acting: skipping batch {b} (time budget)")
            continue
        images, prompts = batch_inputs(g, b, dev, seed=b)
        row = rows[b] = {"prompt_len": int(prompts.input_ids.shape[1])}
        reps = args.reps if b <= 64 else max(2, args.reps - 2)
        fns = {"prefill": prefill_fn(g, images, prompts)}
        if "generate" in args.modes:
            fns["generate"] = generate_fn(backbone, images, prompts)
        fns.update({f"act_{m}": (lambda p=p: p.act(images, prompts)) for m, p in policies.items()})
        for name, fn in fns.items():
            try:
                row[name] = median_time(fn, dev, reps)
            except Exception as e:  # noqa: BLE001 -- report and go on
                row[name] = None
                log(f"batch {b} {name} FAILED: {type(e).__name__}: {e}")
                traceback.print_exc()
            for p in policies.values():
                p.release_decode_cache()
            free(dev)
        row["floor"] = row["prefill"] + 7 * read_s if row.get("prefill") else None
        log(f"batch {b}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    res["graph_captures"] = g._decoder.captures


# -- (b) LoRA PPO update, (c) CRL vs PPO memory ---------------------------------------------------
def ppo_step(policy, critic, opt, images, prompts, tokens):
    n = len(tokens)
    out = policy.evaluate(images, prompts, tokens)
    adv = torch.randn(n, device=tokens.device)
    loss, _ = crl_loss(log_prob=out.log_prob, old_log_prob=out.log_prob.detach() + 0.01 * adv,
                       advantage=adv, value=critic(out.phi, out.emb), value_target=torch.randn(n, device=tokens.device),
                       entropy=out.entropy, clip_eps=0.2, alpha=0.0, beta_v=0.0, eta=1.0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def crl_step(policy, old, critic, anchor_critic, opt, images, prompts, tokens, n_anchor):
    """CRLModule.training_step's work: the old adapter's targets for the anchors (old goals on the
    current states), one evaluate over current + anchor samples, anchor critic, KL + value terms.
    ``images``: a tensor or a TensorDict of views (OFT); ``tokens``: action tokens or chunks."""
    from modules.policy.backbone import cat_prompts

    n = len(tokens)
    a_img, a_prompts = images[:n_anchor], policy.encode([INSTRUCTIONS[(i + 1) % len(INSTRUCTIONS)]
                                                         for i in range(n_anchor)])
    a_tok = tokens[:n_anchor]
    with torch.no_grad():
        old_lp = old.evaluate(a_img, a_prompts, a_tok).token_log_probs  # pi_old(.|s, g_old) (OFT: mu, log b)
    out = policy.evaluate(torch.cat([images, a_img]), cat_prompts(prompts, a_prompts), torch.cat([tokens, a_tok]))
    adv = torch.randn(n, device=tokens.device)
    loss, _ = crl_loss(log_prob=out.log_prob[:n], old_log_prob=out.log_prob[:n].detach() + 0.01 * adv, advantage=adv,
                       value=critic(out.phi[:n], out.emb[:n]), value_target=torch.randn(n, device=tokens.device),
                       entropy=out.entropy[:n], anchor_token_log_probs=out.token_log_probs[n:],
                       anchor_old_token_log_probs=old_lp,
                       anchor_value=anchor_critic(out.phi[n:], out.emb[n:]),
                       anchor_value_target=torch.randn(n_anchor, device=tokens.device),
                       kl_fn=getattr(policy, "kl_to_old_policy", None),  # chunk policies: their own KL
                       clip_eps=0.2, alpha=1e-5, beta_v=1e-3, eta=1.0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed_step(fn, dev, reps, opt, samples=None) -> dict:
    """Median seconds of a training step ``fn`` and the peak memory it reached (from a freed
    cache); an out-of-memory step is recorded as such. ``samples``: also samples/s."""
    free(dev)
    reset_peak(dev)
    try:
        t = median_time(fn, dev, reps)
        row = {"step_s": t, "peak_gib": peak_gib(dev)}
    except torch.OutOfMemoryError:
        row = {"step_s": None, "peak_gib": "OOM"}
        opt.zero_grad(set_to_none=True)
    if samples is not None:
        row["samples_per_s"] = samples / row["step_s"] if row["step_s"] else None
    return row


def profile_step(fn, res, key, top=25):
    """torch.profiler over one update step: the kernels that take the GPU time, printed and kept."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    table = events.table(sort_by="cuda_time_total", row_limit=top)
    # GPU busy = the kernels' own time; far below the wall time means the host (launches,
    # Python) holds the GPU up, not its arithmetic
    # the kernels' own entries only (an aten op also carries its kernels' time as self device time)
    kernels_only = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    busy = sum(e.self_device_time_total for e in kernels_only) / 1e6
    kernels = sum(e.count for e in kernels_only)
    summary = {"wall_s": wall, "gpu_busy_s": busy, "gpu_busy_fraction": busy / wall, "kernel_launches": kernels}
    print(table, summary, flush=True)
    res.setdefault("profile", {})[key] = {"table": table, **summary}


def training_parts(policy, dev, res):
    """The policy in train mode, a V critic and AdamW over both (LoRA: the trainable parameters)."""
    policy.train()
    critic = GoalConditionedCritic(policy.feature_dim, [256, 256]).to(dev)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    res["lora_trainable_params"] = sum(p.numel() for p in trainable)
    return critic, torch.optim.AdamW(trainable + list(critic.parameters()), lr=1e-5)


def bench_update(args, backbone, dev, res):
    policy = TokenVLAPolicy(backbone, action_tokens=7, action_bins=256,
                            lora={"r": 32, "alpha": 64, "target_modules": "all-linear",
                                  "compute_dtype": args.lora_compute}).to(dev)
    critic, opt = training_parts(policy, dev, res)
    rows = res.setdefault("update", {})
    # fused LoRA (lora.fused) against PEFT's forward: the same policy, its layers switched
    fused_settings = args.lora_fused if args.lora_compute == "backbone" else [0]
    for ckpt in map(bool, args.checkpointing):
        set_gradient_checkpointing(backbone.model, ckpt)
        for mb in args.micro:
            for fused in fused_settings:
                if time.perf_counter() - T0 > args.budget_s * 0.85:
                    log(f"update: skipping micro-batch {mb} ckpt={ckpt} fused={fused} (time budget)")
                    continue
                set_fused_lora(backbone.model, bool(fused))
                images, prompts = batch_inputs(policy, mb, dev, seed=mb)
                tokens = torch.randint(0, 256, (mb, 7), device=dev)
                key = f"mb{mb}_ckpt{int(ckpt)}_fused{fused}"
                rows[key] = timed_step(lambda: ppo_step(policy, critic, opt, images, prompts, tokens), dev,
                                       args.train_reps, opt, samples=mb)
                log(f"update {key}: {rows[key]}")
                if args.profile and dev.type == "cuda" and rows[key]["step_s"] and not ckpt and mb == args.micro[0]:
                    profile_step(lambda: ppo_step(policy, critic, opt, images, prompts, tokens), res, key)
                free(dev)
    set_fused_lora(backbone.model, bool(fused_settings[-1]))

    # (c) CRL vs PPO at one micro-batch, checkpointing on (the setting one would train with)
    mb, n_anchor = args.crl_micro, args.crl_micro // 2  # data.anchor_fraction 0.5 (the kit's default)
    set_gradient_checkpointing(backbone.model, True)
    snapshot_adapter(policy.backbone.model)
    old = AdapterPolicy(policy)
    anchor_critic = frozen_copy(critic)
    images, prompts = batch_inputs(policy, mb, dev, seed=99)
    tokens = torch.randint(0, 256, (mb, 7), device=dev)
    out = res.setdefault("crl_vs_ppo", {"micro_batch": mb, "anchors": n_anchor})
    for name, fn in (("ppo", lambda: ppo_step(policy, critic, opt, images, prompts, tokens)),
                     ("crl", lambda: crl_step(policy, old, critic, anchor_critic, opt, images, prompts, tokens,
                                              n_anchor))):
        out[name] = timed_step(fn, dev, args.train_reps, opt)
        log(f"{name} at micro-batch {mb}: {out[name]}")


def run_sections(sections: dict, args, dev, res, *fn_args) -> None:
    """``fn(*fn_args)`` for each section not in ``args.skip``; a failing section is reported and
    the next one runs; ``res`` is written to ``args.out`` after every section."""
    for name, fn in sections.items():
        if name in args.skip:
            continue
        try:
            fn(*fn_args)
        except Exception:  # noqa: BLE001 -- keep what was measured
            log(f"section {name} FAILED")
            traceback.print_exc()
        free(dev)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1, default=str)


def table(res):
    lines = []
    r = res.get("weight_read", {})
    lines.append(f"weights read per decode step {r.get('bytes', 0) / 1e9:.2f} GB; copy bandwidth "
                 f"{r.get('copy_bandwidth_Bps', float('nan')) / 1e12:.2f} TB/s -> {r.get('read_s', float('nan')) * 1e3:.2f} ms"
                 + (f"; captured 1-token step at batch 1: {r['graph_step_b1_s'] * 1e3:.2f} ms" if "graph_step_b1_s" in r else ""))
    lines.append("")
    lines.append("| batch | prompt len | prefill s | floor s (prefill + 7 reads) | generate | act dynamic | act static | "
                 "act cuda_graph | graph / floor | graph vs generate | act cuda_graph+compile | compiled / floor |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def cell(b, t):
        return f"{t:.3f} s ({b / t:.1f}/s)" if t else "failed"

    for b, row in res.get("acting", {}).items():
        g, f, gen = row.get("act_cuda_graph"), row.get("floor"), row.get("generate")
        c = row.get("act_cuda_graph+compile")
        lines.append(f"| {b} | {row['prompt_len']} | {row.get('prefill') or float('nan'):.3f} | "
                     f"{cell(b, f)} | {cell(b, gen)} | {cell(b, row.get('act_dynamic'))} | "
                     f"{cell(b, row.get('act_static'))} | {cell(b, g)} | "
                     f"{(g / f) if g and f else float('nan'):.3f}x | {(gen / g) if g and gen else float('nan'):.2f}x | "
                     f"{cell(b, c)} | {(c / f) if c and f else float('nan'):.3f}x |")
    if "update" in res:
        lines += ["", f"LoRA r=32 all-linear ({res.get('lora_trainable_params', 0) / 1e6:.1f} M trainable) PPO update:",
                  "| micro-batch | checkpointing | fused LoRA | samples/s | step s | peak GiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for key, row in res["update"].items():
            mb, rest = key[2:].split("_ckpt")
            ck, fused = rest.split("_fused")
            sps = f"{row['samples_per_s']:.1f}" if row["samples_per_s"] else "-"
            st = f"{row['step_s']:.3f}" if row["step_s"] else "-"
            pk = row["peak_gib"] if isinstance(row["peak_gib"], str) else f"{row['peak_gib']:.1f}"
            lines.append(f"| {mb} | {'on' if ck == '1' else 'off'} | {'on' if fused == '1' else 'off'} | {sps} | {st} | {pk} |")
    if "crl_vs_ppo" in res:
        c = res["crl_vs_ppo"]
        lines += ["", f"CRL vs PPO step, micro-batch {c['micro_batch']} (+{c['anchors']} anchor samples for CRL), "
                  "checkpointing on:", "| step | s | peak GiB |", "| --- | --- | --- |"]
        for name in ("ppo", "crl"):
            if name in c:
                row = c[name]
                pk = row["peak_gib"] if isinstance(row["peak_gib"], str) else f"{row['peak_gib']:.1f}"
                lines.append(f"| {name} | {row['step_s'] or float('nan'):.3f} | {pk} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny model on the CPU (checks the script)")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--micro", type=int, nargs="+", default=None)
    ap.add_argument("--crl_micro", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train_reps", type=int, default=3)
    ap.add_argument("--budget_s", type=float, default=420.0, help="sections are skipped past this")
    ap.add_argument("--skip", nargs="*", default=[], choices=["acting", "update"])
    ap.add_argument("--modes", nargs="+", default=["generate", "dynamic", "static", "cuda_graph"],
                    choices=["generate", "dynamic", "static", "cuda_graph", "static+compile", "cuda_graph+compile"],
                    help="acting paths to time (+compile: compile_decode=true)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--lora_compute", default="backbone", choices=["float32", "backbone"],
                    help="lora.compute_dtype of the update's policy")
    ap.add_argument("--lora_fused", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                    help="lora.fused settings timed (compute_dtype backbone), on the same policy")
    ap.add_argument("--checkpointing", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                    help="gradient checkpointing settings timed")
    ap.add_argument("--profile", action="store_true", help="profile one update step at the first micro-batch")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    args.batches = args.batches or ([2, 4] if args.small else [16, 64, 128])
    args.micro = args.micro or ([2, 4] if args.small else [8, 16, 32])
    args.crl_micro = args.crl_micro or (4 if args.small else 16)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "args": vars(args)}
    import transformers
    res["transformers"] = transformers.__version__
    log(res)
    backbone = build(args, dev, dtype)
    n_params = sum(p.numel() for p in backbone.parameters())
    res["params"] = n_params
    log(f"built {n_params / 1e9:.3f} B params, dtype {next(backbone.parameters()).dtype}, "
        f"memory {torch.cuda.memory_allocated() / 2**30 if dev.type == 'cuda' else 0:.1f} GiB")
    run_sections({"acting": bench_acting, "update": bench_update}, args, dev, res, args, backbone, dev, res)
    print(table(res), flush=True)


if __name__ == "__main__":
    main()
