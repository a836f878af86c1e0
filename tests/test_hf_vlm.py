"""HFVisionLanguageBackbone on real tiny transformers models (PaliGemma, Idefics3, SmolVLM; a
saved Llava through the pretrained path): layouts, save/load, act == evaluate, KV cache, LoRA,
errors, and train.py quickstart-style with CRL on and off."""
import glob
import json
import os

import pytest
import torch
from conftest import ROOT, WORDS, run_train, run_train_cases, small_config

from modules.critics import GoalConditionedCritic
from modules.policy import HFVisionLanguageBackbone, TinyLlava, TokenVLAPolicy
from modules.policy.backbone import positions_from_mask

KEY = "model.policy.init_args.backbone.init_args.pretrained"
SIZES = {"paligemma": {}, "idefics3": {"image_size": 64}, "smolvlm": {"image_size": 64}}  # 64: pixel shuffle 2
# each family with each attention mask it supports
MODES = [("paligemma", "causal"), ("paligemma", "image"), ("paligemma", "prefix"),
         ("idefics3", "causal"), ("smolvlm", "causal")]
MIXED = [WORDS[0], "pick up a blue box", WORDS[2], WORDS[1]]  # different lengths: left padding


def tiny(family="paligemma", attention=None, action_bins=3, **kw):
    config = {"family": family, "words": WORDS + ["pick up a"], "action_bins": action_bins, **SIZES[family]}
    return HFVisionLanguageBackbone(config=config, attention=attention, seed=0, **kw)


def images(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 56, 56), dtype=torch.uint8, generator=g)


def hidden(bb, instructions, imgs):
    p = bb.encode(instructions)
    return bb(p.input_ids, p.attention_mask, bb.preprocess(imgs))[0], p


def test_paligemma_builds_from_config_with_its_prompt_layout():
    bb = tiny()
    tok = bb.tokenizer
    assert bb.image_token_count == 49  # (56 / 8)^2 SigLIP patches
    assert 50_000 < sum(p.numel() for p in bb.parameters()) < 200_000
    p = bb.encode(["go to the red ball"])
    ids = p.input_ids[0].tolist()
    # PaliGemmaProcessor's layout: image tokens, then BOS + text + "\n"
    assert ids[:49] == [bb.image_token_id] * 49 and ids[49] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[50:]) == ["go", "to", "the", "red", "ball", "\n"]
    assert p.goal_mask[0].nonzero().flatten().tolist() == [50, 51, 52, 53, 54]
    assert p.image_mask[0].nonzero().flatten().tolist() == list(range(49))
    # <image> is an added token after the base vocabulary (as in PaliGemma's tokenizer), whose
    # last ids are the action tokens
    assert bb.image_token_id >= tok.vocab_size
    assert tok.convert_ids_to_tokens(bb.action_token_ids(3).tolist()) == ["<act_0>", "<act_1>", "<act_2>"]
    assert type(bb.model).__name__ == "PaliGemmaForConditionalGeneration"


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_and_smolvlm_build_with_one_global_image(family):
    bb = tiny(family)
    assert bb.image_token_count == 16  # (64 / 8)^2 patches / pixel shuffle 2^2
    p = bb.encode(["go to the red ball"])
    toks = bb.tokenizer.convert_ids_to_tokens(p.input_ids[0].tolist())
    assert toks[:5] == ["<bos>", "user", ":", "<fake_token_around_image>", "<global-img>"]
    assert toks[5:21] == ["<image>"] * 16
    assert toks[21:] == ["<fake_token_around_image>", "go", "to", "the", "red", "ball",
                         "<end_of_utterance>", "\n", "assistant", ":"]
    assert [toks[i] for i in p.goal_mask[0].nonzero().flatten()] == ["go", "to", "the", "red", "ball"]
    assert bb.preprocess(images(2)).shape == (2, 1, 3, 64, 64)  # [B, num_images, 3, H, W], resized


@pytest.mark.parametrize("family", list(SIZES))
def test_save_pretrained_and_load_back_gives_identical_hidden_states(tmp_path, family):
    bb = tiny(family)
    bb.save_pretrained(str(tmp_path))
    loaded = HFVisionLanguageBackbone(pretrained=str(tmp_path))
    assert type(loaded.model) is type(bb.model) and loaded.image_token_count == bb.image_token_count
    if family != "smolvlm":  # SmolVLM's processor needs num2words + torchvision: tokenizer + image processor
        assert type(loaded.processor) is type(bb.processor)
    assert loaded.image_processor is not None
    h, p = hidden(bb, MIXED, images())
    h2, p2 = hidden(loaded, MIXED, images())
    assert torch.equal(p.input_ids, p2.input_ids) and torch.equal(p.goal_mask, p2.goal_mask)
    assert torch.allclose(h, h2, atol=1e-6, rtol=0)


def test_a_saved_tiny_llava_loads_through_the_pretrained_path(tmp_path):
    """A third family, Llava: the same prompt ids and hidden states as TinyLlava itself."""
    ref = TinyLlava(words=WORDS + ["pick up a"], hidden_size=32, vision_hidden_size=32, layers=2,
                    vision_layers=1, heads=2, seed=0)
    ref.model.save_pretrained(str(tmp_path))
    ref.tokenizer.save_pretrained(str(tmp_path))
    bb = HFVisionLanguageBackbone(pretrained=str(tmp_path))
    h, p = hidden(ref, MIXED, images())
    h2, p2 = hidden(bb, MIXED, images())
    for a, b in zip((p.input_ids, p.attention_mask, p.image_mask, p.goal_mask),
                    (p2.input_ids, p2.attention_mask, p2.image_mask, p2.goal_mask)):
        assert torch.equal(a, b)
    assert torch.allclose(h, h2, atol=1e-5, rtol=0)
    assert [n for n, q in bb.named_parameters() if not q.requires_grad] == [
        "model.model.vision_tower.post_layernorm.weight", "model.model.vision_tower.post_layernorm.bias"]


@pytest.mark.parametrize("family,attention", MODES)
@pytest.mark.parametrize("n_tokens,bins", [(1, 3), (7, 256)])
def test_act_log_probs_equal_evaluate_log_probs(family, attention, n_tokens, bins):
    policy = TokenVLAPolicy(tiny(family, attention, action_bins=bins), action_tokens=n_tokens, action_bins=bins)
    torch.manual_seed(0)
    imgs, prompts = images(), policy.encode(MIXED)
    acted = policy.act(imgs, prompts)
    trained = policy.evaluate(imgs, prompts, acted.tokens)
    assert acted.tokens.shape == (4, n_tokens) and ((acted.tokens >= 0) & (acted.tokens < bins)).all()
    for a, b in ((acted.token_log_probs, trained.token_log_probs), (acted.log_prob, trained.log_prob),
                 (acted.phi, trained.phi), (acted.emb, trained.emb)):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,attention", MODES)
def test_kv_cached_decode_equals_a_full_forward(family, attention):
    bb = tiny(family, attention)
    prompts = bb.encode(MIXED)
    pix = bb.preprocess(images())
    actions = bb.action_token_ids(3)[torch.tensor([[0, 2, 1, 1], [1, 1, 0, 2], [2, 0, 0, 1], [0, 0, 2, 2]])]
    mask, pos = prompts.attention_mask, positions_from_mask(prompts.attention_mask)
    with torch.no_grad():
        h, cache = bb(prompts.input_ids, mask, pix, pos, use_cache=True)
        steps = [h]
        for k in range(actions.shape[1]):
            mask = torch.cat([mask, mask.new_ones(4, 1)], 1)
            pos = pos[:, -1:] + 1
            h, cache = bb(actions[:, k:k + 1], mask, None, pos, past_key_values=cache, use_cache=True)
            steps.append(h)
        full, _ = bb(torch.cat([prompts.input_ids, actions], 1), mask, pix)
    real = mask.bool()
    assert torch.allclose(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["causal", "image", "prefix"])
def test_paligemma_attention_masks(attention):
    """Gemma in PaliGemma is built bidirectional and transformers skips the mask of an unpadded
    batch: a row must see the same attention alone as inside a left-padded batch, and only the
    prefix-LM lets the image positions read the instruction."""
    bb = tiny(attention=attention)
    imgs = images(1).repeat(4, 1, 1, 1)
    batch, p = hidden(bb, MIXED, imgs)
    for i, s in enumerate(MIXED):
        alone, _ = hidden(bb, [s], imgs[:1])
        assert torch.allclose(batch[i][p.attention_mask[i].bool()], alone[0], atol=1e-5, rtol=0)
    phi = torch.stack([batch[i][p.image_mask[i]] for i in range(4)])
    goal_independent = torch.allclose(phi[0], phi[1], atol=1e-6, rtol=0)
    assert goal_independent == (attention != "prefix")
    # the image block is bidirectional except in "causal": its first position sees the others
    causal, _ = hidden(tiny(attention="causal"), MIXED[:1], imgs[:1])
    assert ((batch[0][p.image_mask[0]][0] - causal[0, 0]).abs().max() > 1e-4) == (attention != "causal")


@pytest.mark.parametrize("family", list(SIZES))
def test_every_trainable_parameter_gets_a_gradient(family):
    """DDP (find_unused_parameters=False) needs a gradient for every trainable parameter."""
    policy = TokenVLAPolicy(tiny(family, action_bins=5), action_tokens=2, action_bins=5)
    out = policy.evaluate(images(2), policy.encode(WORDS[:2]), torch.tensor([[0, 1], [2, 3]]))
    critic = GoalConditionedCritic(policy.feature_dim, [8])
    (out.log_prob.sum() + out.entropy.sum() + critic(out.phi, out.emb).sum()).backward()
    assert [n for n, p in policy.named_parameters() if p.requires_grad and p.grad is None] == []


def test_peft_lora_applies():
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    ref = TokenVLAPolicy(tiny(), action_tokens=3, action_bins=3)
    policy = TokenVLAPolicy(tiny(), action_tokens=3, action_bins=3, lora=lora)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("vision_tower" in n for n in trainable) and any("language_model" in n for n in trainable)
    imgs, prompts, tokens = images(), policy.encode(MIXED), torch.tensor([[0, 1, 2]] * 4)
    before = policy.evaluate(imgs, prompts, tokens)  # LoRA B = 0: the base model's log-probs
    assert torch.allclose(before.token_log_probs, ref.evaluate(imgs, prompts, tokens).token_log_probs, atol=1e-6)
    old = policy.snapshot()
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    (-before.log_prob.sum()).backward()
    opt.step()
    after = policy.evaluate(imgs, prompts, tokens)
    assert (after.log_prob - before.log_prob).abs().max() > 1e-4
    assert torch.allclose(old.evaluate(imgs, prompts, tokens).log_prob, before.log_prob, atol=1e-6)
    acted = policy.act(imgs, prompts)
    assert torch.allclose(acted.log_prob, policy.evaluate(imgs, prompts, acted.tokens).log_prob, atol=1e-5)


def test_dtype_knob_bfloat16(tmp_path):
    bb = tiny(dtype="bfloat16")
    assert bb.vlm.dtype == torch.bfloat16 and bb.preprocess(images(1)).dtype == torch.bfloat16
    out = TokenVLAPolicy(bb).act(images(2), bb.encode(WORDS[:2]))
    assert torch.isfinite(out.log_prob).all()
    tiny().save_pretrained(str(tmp_path))
    assert HFVisionLanguageBackbone(pretrained=str(tmp_path), dtype="bfloat16").vlm.dtype == torch.bfloat16


def _error(**kwargs) -> str:
    with pytest.raises(ValueError) as err:
        HFVisionLanguageBackbone(**kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_clear_errors(tmp_path):
    msg = _error(pretrained="/no/such/dir")
    assert msg.startswith(f"{KEY}='/no/such/dir': no such directory")
    msg = _error(pretrained=str(tmp_path))
    assert msg.startswith(f"{KEY}={str(tmp_path)!r}: no config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "model_type 'gpt2' has no prompt format" in _error(pretrained=str(tmp_path))
    tiny().model.config.save_pretrained(str(tmp_path))  # a PaliGemma config, no weights, no tokenizer
    msg = _error(pretrained=str(tmp_path))
    assert msg.startswith(f"{KEY}={str(tmp_path)!r}: cannot load the model offline")
    assert "give exactly one" in _error()
    assert "config.family" in _error(config={"family": "qwen2_vl"})
    assert "config.hidden" in _error(config={"family": "paligemma", "hidden": 8})
    assert "config.scale_factor" in _error(config={"family": "idefics3", "image_size": 56})
    assert "attention='image': idefics3 supports causal" in _error(config={"family": "idefics3", "image_size": 64},
                                                                     attention="image")


def test_train_py_missing_pretrained_path_is_one_error_line(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  policy:\n    init_args:\n      backbone:\n"
                       "        class_path: modules.policy.HFVisionLanguageBackbone\n"
                       "        init_args: {pretrained: /no/such/dir}\n")
    res = run_train("--config", small_config(tmp_path, "missing"), "--config", str(overlay), timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {KEY}='/no/such/dir': no such directory")
    assert not glob.glob(str(tmp_path / "runs" / "**" / "metrics.json"), recursive=True)


@pytest.fixture(scope="module")
def paligemma_runs(tmp_path_factory):
    """Both runs, each its own train.py process (forked after the imports): {ablation: (dir, result)}."""
    cases = [None, "seq_ft"]
    runs = run_train_cases(tmp_path_factory, cases, lambda ablation, d: (
        "--config", small_config(d, ablation or "crl", iterations=1, ablation=ablation),
        "--config", os.path.join(ROOT, "configs", "policies", "paligemma_tiny.yaml")), timeout=900)
    return dict(zip(cases, runs))


@pytest.mark.parametrize("ablation", [None, "seq_ft"])
def test_train_py_quickstart_stream_with_tiny_paligemma(paligemma_runs, ablation):
    """The BabyAI 3-task stream, 1 iteration per task, CRL on (quickstart) and off (seq_ft)."""
    name = ablation or "crl"
    tmp_path, res = paligemma_runs[ablation]
    assert res.returncode == 0, res.stderr[-3000:]
    path = glob.glob(str(tmp_path / "runs" / name / "version_*" / "metrics.json"))[0]
    with open(path) as f:
        m = json.load(f)
    assert m["complete"] and len(m["R"]) == 3 and all(len(r) == 3 for r in m["R"])
    ckpt = torch.load(os.path.join(os.path.dirname(path), "checkpoints", "task2_end.ckpt"), weights_only=False)
    assert any("multi_modal_projector" in k for k in ckpt["state_dict"])  # PaliGemma's weights trained
    assert ckpt["state_dict"]["critic.net.0.weight"].shape[1] == 2 * 32  # [phi; emb], hidden size 32
    assert ckpt["crl"]["has_anchor"] == (ablation is None)
