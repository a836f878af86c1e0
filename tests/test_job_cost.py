"""What the 7B job on one GPU depends on, checked at tiny size on a CPU: the timing breakdown,
micro-batched updates equal to whole-minibatch ones, no-grad target passes that reuse the acting
batch's decode cache (never a larger one), LoRA branches in the backbone's dtype, and the random
OpenVLA checkpoint writer the GPU benchmark uses."""
import os
import sys

import pytest
import torch
from tensordict import TensorDict

from modules.crl_module import CRLModule, _prompts_to_td
from modules.policy import OpenVLABackbone, TokenVLAPolicy
from modules.policy.base import act_in_chunks
from modules.policy.lora import AdapterPolicy, _BranchLinear, set_fused_lora, snapshot_adapter
from modules.policy.openvla import decoding
from modules.timing import PhaseTimer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTIONS = ["go to the red ball", "pick up the blue box", "open the top drawer of the cabinet"]
LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}


def _policy(seed=0, dtype="float32", **kwargs):
    torch.manual_seed(seed)
    backbone = OpenVLABackbone(config={"seed": seed, "words": INSTRUCTIONS[:1]}, dtype=dtype)
    return TokenVLAPolicy(backbone, action_tokens=7, action_bins=256, **kwargs)


def _images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 56, 56), dtype=torch.uint8, generator=g)


# -- timing ----------------------------------------------------------------------------------
def test_phases_nest_and_the_row_derives_env_time_and_throughput():
    from callbacks.iteration_timing import summarize

    timer = PhaseTimer()
    with timer.phase("collection"):
        with timer.phase("acting"):
            sum(range(10000))
        with timer.phase("env_start"):
            pass
    with timer.phase("update/forward"):
        pass
    seconds = timer.pop()
    assert set(seconds) == {"collection", "collection/acting", "collection/env_start", "update/forward"}
    assert seconds["collection"] >= seconds["collection/acting"] + seconds["collection/env_start"]
    assert timer.pop() == {}
    row = summarize({"collection": 3.0, "collection/acting": 2.0, "collection/env_start": 0.5,
                     "collection/acting/compile_capture": 0.25, "evaluation/acting/compile_capture": 0.5,
                     "reward_shaping": 0.5, "rollout_targets": 1.0, "anchor_targets": 2.0, "update/forward": 1.5,
                     "update/backward": 1.5, "update/optimizer": 1.0, "evaluation": 9.0}, 512, 20.0)
    assert row["time/collection/env"] == 0.5 and row["time/update"] == 4.0
    assert row["time/compile_capture"] == 0.75
    assert row["perf/env_steps_per_s"] == 512 / (3.0 + 0.5 + 1.0 + 2.0 + 4.0)  # evaluation apart
    assert row["perf/env_steps_per_s_wall"] == 512 / 20.0


# -- micro-batches -------------------------------------------------------------------------------
def _module(policy, micro_batch_size=None, **kw):
    module = CRLModule(policy, critic_hidden_sizes=[16], micro_batch_size=micro_batch_size, alpha=0.5, beta_v=0.3,
                       entropy_coef=0.01, replay_pg_coef=0.5, replay_bc_coef=0.2, **kw)
    module.freeze_anchor()  # anchors present: every kind of sample in every slice
    return module


def _batch(policy, n, na, nr=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cur_prompts = policy.encode([INSTRUCTIONS[0]] * n)
        acted = policy.act(_images(n, seed), cur_prompts)
        anc_prompts = policy.encode([INSTRUCTIONS[1 + i % 2] for i in range(na)])
        old = policy.act(_images(na, seed + 1), anc_prompts)
    cur = TensorDict({"image": _images(n, seed), "tokens": acted.tokens, "log_prob": acted.log_prob + 0.05,
                      "advantage": torch.randn(n, generator=g), "value_target": torch.randn(n, generator=g),
                      **_prompts_to_td(cur_prompts)}, batch_size=[n])
    anc = TensorDict({"image": _images(na, seed + 1), "tokens": old.tokens,
                      "old_token_log_probs": old.token_log_probs.roll(1, -1), "head": torch.zeros(na, dtype=torch.long),
                      "value_target": torch.randn(na, generator=g), **_prompts_to_td(anc_prompts)}, batch_size=[na])
    with torch.no_grad():  # ER's replayed transitions
        rep_prompts = policy.encode([INSTRUCTIONS[2]] * nr)
        stored = policy.act(_images(nr, seed + 2), rep_prompts)
    rep = TensorDict({"image": _images(nr, seed + 2), "tokens": stored.tokens, "log_prob": stored.log_prob - 0.1,
                      "advantage": torch.randn(nr, generator=g), **_prompts_to_td(rep_prompts)}, batch_size=[nr])
    return cur, anc, rep


def _grads(module, cur, anc, rep):
    """Gradients of one minibatch, summed over its slices as ``training_step`` does."""
    module.zero_grad()
    adv, rep_adv = (module._scale_advantage(x.get("advantage")) for x in (cur, rep))
    n, na, nr = len(cur), len(anc), len(rep)
    slices = module._slices(n, na, nr)
    logged = {}
    for k, (cs, ans, rs) in enumerate(slices):
        shares = [(x.stop - x.start) / m for x, m in ((cs, n), (ans, na), (rs, nr))]
        loss, terms = module._slice_loss(cur[cs], adv[cs], anc[ans], (rep[rs], rep_adv[rs]), shares, first=k == 0)
        loss.backward()
        for key, v in terms.items():
            logged[key] = logged.get(key, 0.0) + v
    return len(slices), {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}, logged


@pytest.mark.parametrize("size", [3, 5, 7])
def test_micro_batches_give_the_minibatch_gradient(size):
    policy = _policy()
    whole, sliced = _module(policy), _module(policy, micro_batch_size=size)
    sliced.load_state_dict(whole.state_dict())
    cur, anc, rep = _batch(policy, n=6, na=4, nr=3)
    k1, g1, t1 = _grads(whole, cur, anc, rep)
    k, g, t = _grads(sliced, cur, anc, rep)
    assert k1 == 1 and k == min(6, -(-13 // size))
    assert g1.keys() == g.keys() and len(g) > 10
    for name in g:  # float32 sums in another order: equal up to float32 rounding of the largest entry
        assert (g[name] - g1[name]).abs().max() <= 1e-5 * g1[name].abs().max() + 1e-7, name
    for name in t1:  # the logged terms are the whole minibatch's too
        assert torch.allclose(torch.as_tensor(t[name]), torch.as_tensor(t1[name]), atol=1e-5), name
    assert t1["kl_old"] > 0 and t1["gcv"] > 0 and t1["er_bc"] > 0 and t1["theory/kl_pi_old_anchor"] > 0


# -- no-grad passes reuse the acting batch's cache ------------------------------------------------
def test_target_passes_use_the_acting_batch_and_allocate_no_larger_cache(monkeypatch):
    policy = _policy(decoding="static")
    module = CRLModule(policy, critic_hidden_sizes=[16])
    with torch.no_grad():
        policy.act(_images(4), policy.encode([INSTRUCTIONS[0]] * 4))  # acting: 4 envs
    assert policy.act_batch_hint() == 4
    module.freeze_anchor()
    batches = []
    real = decoding.StaticKV.__init__

    def spy(self, layers, batch, *args, **kwargs):
        batches.append(batch)
        real(self, layers, batch, *args, **kwargs)

    monkeypatch.setattr(decoding.StaticKV, "__init__", spy)
    samples = TensorDict({"image": _images(10, seed=3)}, batch_size=[10])
    anchors = module._anchor_samples(samples, INSTRUCTIONS[1:], 1.0, None)  # 10 anchors, 3 chunks of 4
    assert anchors.batch_size == torch.Size([10]) and anchors.get("old_token_log_probs").shape == (10, 7, 256)
    assert batches and max(batches) <= 4  # new caches only for other prompt lengths, never more rows
    # the padded chunks give what one call on all rows gives (greedy: no sampling)
    images, prompts = _images(10, seed=5), policy.encode([INSTRUCTIONS[i % 3] for i in range(10)])
    with torch.no_grad():
        chunked = act_in_chunks(policy.act, images, prompts, 4, pad=True, greedy=True)
        whole = policy.act(images, prompts, greedy=True)
    assert torch.equal(chunked.tokens, whole.tokens)
    assert torch.allclose(chunked.token_log_probs, whole.token_log_probs, atol=1e-5)


# -- LoRA branches in the backbone's dtype -----------------------------------------------------
def test_lora_branches_in_bf16_keep_float32_weights_and_match_float32_branches():
    fp32 = _policy(dtype="bfloat16", lora=LORA)
    bf16 = _policy(dtype="bfloat16", lora={**LORA, "compute_dtype": "backbone"})
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(fp32.named_parameters(), bf16.named_parameters()):
            assert n1 == n2
            if "lora_B" in n1:
                p1.normal_(0, 0.05)
                p2.copy_(p1)
    branches = [m for m in bf16.modules() if isinstance(m, _BranchLinear)]
    assert branches and all(m.weight.dtype == torch.float32 for m in branches)
    images, prompts = _images(3), bf16.encode(INSTRUCTIONS)
    torch.manual_seed(0)
    acted = bf16.act(images, prompts)
    out = bf16.evaluate(images, prompts, acted.tokens)
    assert torch.allclose(out.log_prob, acted.log_prob, atol=0.05)  # bf16 rounding, same code path
    ref = fp32.evaluate(images, prompts, acted.tokens)
    assert (out.token_log_probs.exp() - ref.token_log_probs.exp()).abs().max() < 0.02
    (-out.log_prob.sum()).backward()
    grads = [m.weight.grad for m in branches]
    assert all(g is not None and g.dtype == torch.float32 for g in grads) and any(g.abs().sum() > 0 for g in grads)
    snapshot_adapter(bf16.backbone.model)  # the old policy's adapter multiplies in bf16 too
    assert sum(isinstance(m, _BranchLinear) for m in bf16.modules()) == 2 * len(branches)


def _lora_params(policy):
    return {n: p for n, p in policy.named_parameters() if p.requires_grad and "lora_" in n}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_lora_forward_and_gradients_equal_pefts(dtype):
    policy = _policy(dtype=dtype, lora={**LORA, "compute_dtype": "backbone", "fused": True})
    model = policy.backbone.model
    with torch.no_grad():
        for name, p in _lora_params(policy).items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    images, prompts = _images(3), policy.encode(INSTRUCTIONS)
    torch.manual_seed(0)
    acted = policy.act(images, prompts)
    runs = {}
    for fused in (True, False):
        assert set_fused_lora(model, fused) > 0
        out = policy.evaluate(images, prompts, acted.tokens)
        (-out.log_prob.sum()).backward()
        runs[fused] = (out.log_prob.detach(), {n: p.grad.clone() for n, p in _lora_params(policy).items()})
        policy.zero_grad(set_to_none=True)
    tol = 1e-5 if dtype == "float32" else 0.05  # bf16: the fused sum rounds once, PEFT's three times
    assert torch.allclose(runs[True][0], runs[False][0], atol=tol)
    assert torch.allclose(runs[True][0], acted.log_prob, atol=tol)  # acting and training agree fused
    g_fused, g_peft = runs[True][1], runs[False][1]
    assert any(g.abs().sum() > 0 for g in g_fused.values())
    for name in g_peft:
        rel = (g_fused[name] - g_peft[name]).norm() / g_peft[name].norm().clamp_min(1e-12)
        assert rel < (1e-4 if dtype == "float32" else 0.1), (name, float(rel))


def test_fused_lora_runs_the_old_adapter_with_its_own_weights():
    policy = _policy(lora={**LORA, "compute_dtype": "backbone", "fused": True})
    for step in range(2):  # the old adapter: a random B; then the trainable one moves away from it
        with torch.no_grad():
            for name, p in _lora_params(policy).items():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        if step == 0:
            snapshot_adapter(policy.backbone.model)
    images, prompts = _images(3), policy.encode(INSTRUCTIONS)
    tokens = torch.randint(0, 256, (3, 7))
    old = AdapterPolicy(policy)
    fused_old, fused_new = old.evaluate(images, prompts, tokens).log_prob, policy.evaluate(images, prompts, tokens).log_prob
    set_fused_lora(policy.backbone.model, False)
    assert torch.allclose(fused_old, old.evaluate(images, prompts, tokens).log_prob, atol=1e-5)
    assert (fused_old - fused_new.detach()).abs().max() > 1e-3


def test_fused_lora_needs_the_backbone_compute_dtype():
    with pytest.raises(ValueError, match=r"model.policy.lora.fused=True: needs compute_dtype: backbone"):
        _policy(lora={**LORA, "fused": True})


def test_bad_lora_compute_dtype_is_one_line():
    with pytest.raises(ValueError, match=r"model.policy.lora.compute_dtype='fp8'"):
        _policy(lora={**LORA, "compute_dtype": "fp8"})


# -- the random OpenVLA checkpoint of the GPU benchmark -------------------------------------------
def test_random_checkpoint_writer_round_trips_through_the_loader(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from random_openvla_checkpoint import SIZES, write

    from modules.policy.openvla.tiny import tiny_openvla

    path = write(str(tmp_path / "openvla"), "tiny", "cpu")
    loaded = OpenVLABackbone(pretrained=path)
    source, _ = tiny_openvla(SIZES["tiny"], "size")
    theirs, ours = source.state_dict(), loaded.model.state_dict()
    assert theirs.keys() == ours.keys()
    for k in theirs:
        if k.startswith("model.language_model.") or k == "lm_head.weight":  # stored in bf16, as OpenVLA ships it
            assert torch.equal(ours[k], theirs[k].to(torch.bfloat16).float()), k
        elif k.endswith("featurizer.embeddings.position_embeddings"):  # OpenVLA's has no class-token row
            assert torch.equal(ours[k][:, 1:], theirs[k][:, 1:]) and not ours[k][:, 0].any(), k
        elif not k.endswith("mask_token"):  # kit-only, never read
            assert torch.equal(ours[k], theirs[k]), k
    policy = TokenVLAPolicy(loaded, action_tokens=7, action_bins=256, norm_stats=path,
                            unnorm_key="libero_goal_no_noops")
    actions = policy.env_action(policy.act(_images(2), policy.encode(INSTRUCTIONS[:2])).tokens)
    assert actions.shape == (2, 7) and torch.isfinite(actions).all()
