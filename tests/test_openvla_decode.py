"""Decoding speed and memory knobs of TokenVLAPolicy on the kit's OpenVLA (tiny random model):
static KV cache / CUDA-graph decoding and gradient checkpointing must not change a log-prob.

CPU: the static-cache path (the same code the CUDA graph records, without the capture), and
checkpointing (act == evaluate within 1e-5 in float32, identical gradients). GPU (marked
``gpu``): the captured graph itself, its reuse and re-capture, and bf16 end to end."""
import copy

import pytest
import torch

from modules.policy import OpenVLABackbone, TinyLlava, TokenVLAPolicy
from modules.policy.lora import AdapterPolicy, snapshot_adapter
from modules.policy.openvla.decoding import KEPT_SHAPES

INSTRUCTIONS = ["go to the red ball", "pick up the blue box", "open the top drawer of the cabinet"]
LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}


def _policy(seed=0, dtype="float32", **kwargs):
    torch.manual_seed(seed)
    backbone = OpenVLABackbone(config={"seed": seed, "words": INSTRUCTIONS[:1]}, dtype=dtype)
    return TokenVLAPolicy(backbone, action_tokens=7, action_bins=256, temperature=1.6, **kwargs)


def _images(n, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 56, 56), dtype=torch.uint8, generator=g).to(device)


def _randomise_lora(policy, scale=0.1):
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)


def _assert_act_equals_evaluate(policy, images, prompts, atol=1e-5, seed=0):
    torch.manual_seed(seed)
    acted = policy.act(images, prompts)
    trained = policy.evaluate(images, prompts, acted.tokens)
    assert acted.tokens.shape == (len(images), 7)
    for name in ("log_prob", "token_log_probs", "phi", "emb"):
        a, b = getattr(acted, name), getattr(trained, name)
        assert torch.allclose(a, b, atol=atol), (name, (a - b).abs().max().item())
    return acted


# -- static KV cache (CPU) -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["static", "cuda_graph"])  # cuda_graph on a CPU: the static path
def test_static_decoding_equals_evaluate_and_dynamic(mode):
    dynamic, fast = _policy(), _policy(decoding=mode)
    assert all(torch.equal(a, b) for a, b in zip(dynamic.state_dict().values(), fast.state_dict().values()))
    images, prompts = _images(3), fast.encode(INSTRUCTIONS)  # three prompt lengths: left padding
    assert (prompts.attention_mask == 0).any()
    acted = _assert_act_equals_evaluate(fast, images, prompts)
    torch.manual_seed(0)  # the same draws as the dynamic-cache path
    assert torch.equal(dynamic.act(images, prompts).tokens, acted.tokens)
    greedy_fast, greedy_dyn = fast.act(images, prompts, greedy=True), dynamic.act(images, prompts, greedy=True)
    assert torch.equal(greedy_fast.tokens, greedy_dyn.tokens)
    assert torch.allclose(greedy_fast.token_log_probs, greedy_dyn.token_log_probs, atol=1e-5)
    # the kept cache is reused by a later call of the same batch (prompts in the same length
    # bucket); another batch gets a cache of its own and the first one is kept beside it
    decoder = fast._decoder
    (key, shape), = decoder._shapes.items()
    _assert_act_equals_evaluate(fast, images.flip(0), fast.encode(INSTRUCTIONS[::-1]), seed=1)
    assert list(decoder._shapes.items()) == [(key, shape)]
    _assert_act_equals_evaluate(fast, _images(5, seed=2), fast.encode(INSTRUCTIONS[1:] * 2 + INSTRUCTIONS[:1]), seed=2)
    assert decoder._shapes[key] is shape and len(decoder._shapes) == 2 and decoder.kept_batch == 5
    for b in range(6, 6 + KEPT_SHAPES):  # only the KEPT_SHAPES most recent shapes stay
        _assert_act_equals_evaluate(fast, _images(b, seed=b), fast.encode((INSTRUCTIONS * b)[:b]), seed=b)
    assert len(decoder._shapes) == KEPT_SHAPES and key not in decoder._shapes
    fast.release_decode_cache()
    assert not decoder._shapes and decoder.kept_batch is None
    _assert_act_equals_evaluate(fast, images, prompts, seed=3)


def test_static_decoding_with_lora_and_the_old_adapter():
    policy = _policy(decoding="static", lora=LORA)
    _randomise_lora(policy)
    images, prompts = _images(3, seed=4), policy.encode(INSTRUCTIONS)
    _assert_act_equals_evaluate(policy, images, prompts)
    snapshot_adapter(policy.backbone.model)
    old = AdapterPolicy(policy)
    _randomise_lora(policy, 0.2)  # the trainable adapter moves on; the old one keeps the snapshot
    torch.manual_seed(5)
    acted_old = old.act(images, prompts)
    assert torch.allclose(acted_old.log_prob, old.evaluate(images, prompts, acted_old.tokens).log_prob, atol=1e-5)
    _assert_act_equals_evaluate(policy, images, prompts, seed=6)
    assert (policy.evaluate(images, prompts, acted_old.tokens).log_prob - acted_old.log_prob).abs().max() > 1e-3


def test_frozen_copy_of_a_static_policy_starts_without_a_cache():
    policy = _policy(decoding="static")
    images, prompts = _images(2), policy.encode(INSTRUCTIONS[:2])
    policy.act(images, prompts)
    clone = copy.deepcopy(policy)
    assert not clone._decoder._shapes and clone._decoder.policy is clone
    _assert_act_equals_evaluate(clone, images, prompts)


def test_bad_decoding_arguments():
    with pytest.raises(ValueError, match="decoding"):
        _policy(decoding="paged")
    with pytest.raises(ValueError, match="compile_decode"):
        _policy(compile_decode=True)
    tiny = TinyLlava(words=INSTRUCTIONS, action_bins=3, hidden_size=32, vision_hidden_size=32, layers=1,
                     vision_layers=1, heads=2)
    with pytest.raises(ValueError, match="decoding: dynamic"):
        TokenVLAPolicy(tiny, action_bins=3, decoding="static")


@pytest.mark.slow
def test_compiled_decode_step_equals_evaluate():
    policy = _policy(decoding="static", compile_decode=True)
    _assert_act_equals_evaluate(policy, _images(3), policy.encode(INSTRUCTIONS))


def test_padding_safe_mask():
    from modules.policy.openvla.modeling import padding_safe_mask

    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    full = padding_safe_mask(pad, 5)
    assert full.shape == (2, 1, 5, 5) and full.any(-1).all()  # no fully masked row (NaN in fused kernels)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(full[1, 0], causal)
    assert torch.equal(full[0, 0, 2:], causal[2:] & pad[0].bool())  # real rows: causal, not padding
    assert torch.equal(full[0, 0, :2], torch.eye(5, dtype=torch.bool)[:2])  # padding rows: themselves
    assert torch.equal(padding_safe_mask(pad, 1), full[:, :, -1:])  # a decode step's row


# -- gradient checkpointing (CPU) ------------------------------------------------------------------
@pytest.mark.parametrize("lora", [None, LORA])
def test_gradient_checkpointing_keeps_log_probs_and_gradients(lora):
    plain, ckpt = _policy(lora=lora), _policy(lora=lora, gradient_checkpointing=True)
    if lora:
        _randomise_lora(plain)
        ckpt.load_state_dict(plain.state_dict())
    plain.train()
    ckpt.train()
    images, prompts = _images(3, seed=7), ckpt.encode(INSTRUCTIONS)
    acted = _assert_act_equals_evaluate(ckpt, images, prompts)  # in train mode, checkpointing on

    layer = ckpt.backbone.vlm.language_model.layers[0].mlp  # inside the checkpointed forward
    calls = []
    handle = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    grads = []
    for policy in (plain, ckpt):
        policy.zero_grad()
        out = policy.evaluate(images, prompts, acted.tokens)
        (out.log_prob.sum() + out.entropy.sum() + out.phi.pow(2).sum() + out.emb.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    handle.remove()
    assert len(calls) == 2  # ckpt's layer ran again in the backward pass: checkpointing is on
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(n.count("lora_") for n in grads[0]) == bool(lora)
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6, rtol=1e-5), n


def test_gradient_checkpointing_with_static_decoding():
    policy = _policy(decoding="static", gradient_checkpointing=True, lora=LORA)
    _randomise_lora(policy)
    policy.train()
    _assert_act_equals_evaluate(policy, _images(3, seed=8), policy.encode(INSTRUCTIONS))


# -- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decoding_on_gpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    policy = _policy(decoding="cuda_graph", lora=LORA).cuda()
    dynamic = _policy(lora=LORA).cuda()
    _randomise_lora(policy)
    dynamic.load_state_dict(policy.state_dict())
    images, prompts = _images(3, device="cuda"), policy.encode(INSTRUCTIONS)
    acted = _assert_act_equals_evaluate(policy, images, prompts, atol=1e-4)
    dec = policy._decoder
    assert dec.captures == 1
    greedy = policy.act(images, prompts, greedy=True)
    assert torch.equal(greedy.tokens, dynamic.act(images, prompts, greedy=True).tokens)
    assert dec.captures == 1  # replayed, not recaptured
    # an optimizer step updates the LoRA weights in place: the graph reads the new values
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    out = policy.evaluate(images, prompts, acted.tokens)
    (-out.log_prob.sum()).backward()
    opt.step()
    _assert_act_equals_evaluate(policy, images, prompts, atol=1e-4, seed=1)
    assert dec.captures == 1
    # a new adapter (the old policy's) gets a graph of its own on the same cache; the trainable
    # adapter's graph does not read the new parameters, so it is replayed, not recaptured
    snapshot_adapter(policy.backbone.model)
    old = AdapterPolicy(policy)
    _randomise_lora(policy, 0.2)
    (key, shape), = dec._shapes.items()
    for k in range(2):
        torch.manual_seed(2)
        a = old.act(images, prompts)
        assert torch.allclose(a.log_prob, old.evaluate(images, prompts, a.tokens).log_prob, atol=1e-4)
        _assert_act_equals_evaluate(policy, images, prompts, atol=1e-4, seed=3)
        assert dec.captures == 2 and list(dec._shapes.items()) == [(key, shape)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_end_to_end_on_gpu():
    policy = _policy(dtype="bfloat16", decoding="cuda_graph", lora=LORA, gradient_checkpointing=True).cuda()
    policy.train()
    images, prompts = _images(4, device="cuda"), policy.encode(INSTRUCTIONS + INSTRUCTIONS[:1])
    base = [p for n, p in policy.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in base)
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)  # PEFT keeps LoRA fp32
    assert policy.backbone.preprocess(images).dtype == torch.bfloat16
    acted = policy.act(images, prompts)
    out = policy.evaluate(images, prompts, acted.tokens)
    assert out.token_log_probs.dtype == torch.float32 and out.phi.dtype == torch.float32
    assert (out.log_prob - acted.log_prob).abs().max() < 0.1  # bf16 rounding, not a different function
    out.log_prob.sum().backward()  # left-padded batch: padding rows must not put NaNs into the gradients
    bad = [n for n, p in policy.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.isfinite().all())]
    assert bad == []
