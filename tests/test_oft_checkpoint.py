"""OpenVLA-OFT checkpoints loaded natively (modules/policy/openvla/oft_backbone.py,
oft_checkpoint.py, adapter.py; modules/policy/oft_vla.py), checked against OFT's own code.

tests/data/openvla_oft_tiny is a tiny OpenVLA-OFT checkpoint written by the OpenVLA-OFT repository's
own code (github.com/moojink/openvla-oft at 213c5ff, with its transformers fork
moojink/transformers-openvla-oft at bc339d9, the one that makes Llama's SDPA attention
bidirectional; timm 0.9.10, PEFT 0.11.1, tokenizers 0.19.1; fp32 on a CPU), as its fine-tuning
saves one: ``OpenVLAForActionPrediction.save_pretrained`` (bf16 safetensors under its own
parameter names, config.json), ``PrismaticProcessor.save_pretrained``, ``dataset_statistics.json``,
``action_head--100_checkpoint.pt`` and ``proprio_projector--100_checkpoint.pt`` (DDP ``module.``
prefixes, bf16) and ``lora_adapter/`` (``get_peft_model(..., LoraConfig(target_modules="all-linear",
init_lora_weights="gaussian"))`` then ``save_pretrained``; r 8, alpha 4). Its sizes are tiny
(DINOv2 / SigLIP towers of width 16 / 24 built by timm's own ``VisionTransformer`` with the real
entry points' flags, a 2-layer Llama of width 16, OpenVLA's vocabulary layout), its K x D = 8 x 7
and 8-D proprio are LIBERO's; the tokenizer is the kit's offline Llama-layout one; the embedding rows
no prompt uses and the LM head (never read on OFT's L1 path) are zeros.

tests/data/openvla_oft_tiny_reference.pt holds 20 random observations (two 28 px camera images,
an 8-D state partly outside the q01..q99 box, one of five instructions) and, for each, what OFT's
``OpenVLAForActionPrediction.predict_action(..., proprio, proprio_projector, action_head)`` returned
(the de-normalised chunk, float64) and its head's output (the normalised chunk): with both cameras
and proprio, with the third-person camera only, and after PEFT's ``merge_and_unload`` of the adapter.
The OFT side prepared its inputs as ``get_vla_action`` does (the processor per camera image,
channel-stacked; ``normalize_proprio``).
"""
import json
import os
import shutil

import pytest
import torch
from conftest import ROOT
from tensordict import TensorDict

from modules.policy.openvla.oft_backbone import OFTOpenVLABackbone
from modules.policy.oft_vla import OFTPolicy

CKPT = os.path.join(ROOT, "tests", "data", "openvla_oft_tiny")
REFERENCE = torch.load(os.path.join(ROOT, "tests", "data", "openvla_oft_tiny_reference.pt"))
OBS = REFERENCE["tensors"]
INSTRUCTIONS = REFERENCE["instructions"]
CASES = {  # reference name -> (backbone arguments)
    "two_images_proprio": {},
    "one_image": {"num_images": 1, "proprio": False},
    "two_images_proprio_lora": {"adapter": os.path.join(CKPT, "lora_adapter")},
}


def policy(no_clip=True, backbone=None, **kw):
    bb = backbone or OFTOpenVLABackbone(pretrained=CKPT)
    bounds = {"action_low": None, "action_high": None} if no_clip else {}
    return OFTPolicy(bb, chunk_size=8, action_dim=7, **bounds, **kw)


def env_td(n=20):
    return TensorDict({"observation": {"image": OBS["image"][:n], "wrist_image": OBS["wrist_image"][:n],
                                       "state": OBS["state"][:n]}}, batch_size=[n])


@pytest.fixture(scope="module")
def policies():
    return {name: policy(backbone=OFTOpenVLABackbone(pretrained=CKPT, **kw)) for name, kw in CASES.items()}


# -- the equivalence with OFT's predict_action ----------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_action_chunk_equals_oft_predict_action(policies, case):
    p = policies[case]
    out = p.act(p.observation(env_td()), p.encode(INSTRUCTIONS), greedy=True)
    normalised, actions = OBS[f"{case}/normalized"], OBS[f"{case}/actions"]
    assert out.tokens.shape == (20, 8, 7)
    assert normalised.std(0).mean() > 0.2  # the chunks differ between observations: a real test
    assert torch.allclose(out.tokens, normalised, atol=2e-5, rtol=0), (out.tokens - normalised).abs().max()
    env = p.env_action(out.tokens).double()  # the same q01 / q99 de-normalisation as OFT's
    assert torch.allclose(env, actions, atol=2e-5, rtol=0), (env - actions).abs().max()
    assert not torch.equal(env, out.tokens.double())  # six of the seven dimensions were de-normalised


def test_what_the_equivalence_rests_on(policies, monkeypatch):
    """Each piece of OFT's forward changes the chunk: the test above can fail."""
    import modules.policy.oft_vla as oft

    p = policies["two_images_proprio"]
    obs, prompts = p.observation(env_td(4)), p.encode(INSTRUCTIONS[:4])
    ref = OBS["two_images_proprio/normalized"][:4]

    bidirectional = oft.bidirectional_mask

    def causal(keys):
        t = keys.shape[1]
        return bidirectional(keys) & torch.ones(t, t, dtype=torch.bool).tril()

    with monkeypatch.context() as m:
        m.setattr(oft, "bidirectional_mask", causal)
        assert (p.act(obs, prompts, greedy=True).tokens - ref).abs().max() > 1e-2
    moved = obs.clone()
    moved["state"] = moved["state"] + 0.05  # the proprio token
    assert (p.act(moved, prompts, greedy=True).tokens - ref).abs().max() > 1e-3
    moved = obs.clone()
    moved["wrist_image"] = moved["wrist_image"].flip(-1)  # the wrist camera
    assert (p.act(moved, prompts, greedy=True).tokens - ref).abs().max() > 1e-3
    one = policies["one_image"]  # the third-person camera only
    assert (one.act(one.observation(env_td(4)), one.encode(INSTRUCTIONS[:4]), greedy=True).tokens
            - ref).abs().max() > 1e-2


# -- what was loaded -------------------------------------------------------------------------
def test_loaded_parts_and_prompt_layout(policies):
    p = policies["two_images_proprio"]
    bb = p.backbone
    assert bb.num_images == 2 and bb.uses_proprio and bb.image_token_count == 32  # 2 x 4 x 4 patches
    assert p.head.mlp.inp[1].weight.shape == (16, 7 * 16) and len(p.head.mlp.blocks) == 2  # OFT's MLPResNet
    assert p.proprio.fc1.weight.shape == (16, 8)
    assert not p.head.slots.requires_grad and not p.head.slots.any()  # OFT's zero placeholders
    saved = torch.load(os.path.join(CKPT, "action_head--100_checkpoint.pt"))
    assert torch.equal(p.head.mlp.blocks[1][1].weight, saved["module.model.mlp_resnet_blocks.1.ffn.1.weight"].float())
    ids = p.encode(["turn on the stove"]).input_ids[0].tolist()
    prompt = bb.tokenizer("In: What action should the robot take to turn on the stove?\nOut:",
                          add_special_tokens=False)["input_ids"]
    assert ids == [1] + [bb.image_token_id] * 32 + [bb.proprio_token_id] + prompt + [29871]
    # the de-normalisation and the proprio statistics are the checkpoint's dataset_statistics.json
    stats = json.load(open(os.path.join(CKPT, "dataset_statistics.json")))["libero_goal_no_noops"]
    assert p.norm[0].tolist() == stats["action"]["q01"] and p.norm[2].tolist() == stats["action"]["mask"]
    assert p.proprio_norm[1].tolist() == stats["proprio"]["q99"]
    state = torch.tensor([stats["proprio"]["q01"], stats["proprio"]["q99"]])
    normed = p._proprio_input(TensorDict({"state": state}, batch_size=[2]))
    assert torch.allclose(normed, torch.tensor([[-1.0] * 8, [1.0] * 8]), atol=1e-6)
    one = policies["one_image"]
    assert one.proprio is None and one.backbone.image_token_count == 16
    assert isinstance(one.observation(env_td(3)), torch.Tensor)  # one camera, no proprio: the image itself


def test_adapter_is_merged_into_the_weights(policies):
    """The LoRA adapter moves the weights by alpha / r * B A (PEFT's merge): a fused qkv split into
    q / k / v, a conv patch embedding, the projector; the end result matched OFT's merged model above."""
    from safetensors.torch import load_file

    base, lora = (policies[k].backbone.model for k in ("two_images_proprio", "two_images_proprio_lora"))
    ad = load_file(os.path.join(CKPT, "lora_adapter", "adapter_model.safetensors"))
    pre = "base_model.model.vision_backbone.featurizer."
    delta = 0.5 * ad[pre + "blocks.0.attn.qkv.lora_B.weight"] @ ad[pre + "blocks.0.attn.qkv.lora_A.weight"]
    k_base = base.model.vision_backbone.featurizer.encoder.layer[0].attention.k_proj.weight
    k_lora = lora.model.vision_backbone.featurizer.encoder.layer[0].attention.k_proj.weight
    assert torch.allclose(k_lora - k_base, delta[16:32], atol=1e-6) and delta.abs().max() > 0.05
    conv = 0.5 * torch.einsum("or,rikl->oikl", ad[pre + "patch_embed.proj.lora_B.weight"][:, :, 0, 0],
                              ad[pre + "patch_embed.proj.lora_A.weight"])
    w = (lora.model.vision_backbone.featurizer.embeddings.patch_embeddings.projection.weight
         - base.model.vision_backbone.featurizer.embeddings.patch_embeddings.projection.weight)
    assert torch.allclose(w, conv, atol=1e-6)


# -- RL on the loaded policy -------------------------------------------------------------------
def test_act_equals_evaluate_and_the_old_policy_keeps_head_and_projector():
    p = policy(lora={"r": 4, "alpha": 8, "target_modules": "all-linear"})
    obs, prompts = p.observation(env_td(4)), p.encode(INSTRUCTIONS[:4])
    torch.manual_seed(0)
    acted = p.act(obs, prompts)
    trained = p.evaluate(obs, prompts, acted.tokens)
    assert torch.allclose(acted.log_prob, trained.log_prob, atol=1e-4)
    assert torch.allclose(acted.phi, trained.phi, atol=1e-5) and torch.allclose(acted.emb, trained.emb, atol=1e-5)
    (trained.log_prob.sum() + trained.phi.sum()).backward()
    grads = {n for n, q in p.named_parameters() if q.requires_grad and q.grad is not None and q.grad.abs().sum() > 0}
    assert {"proprio.fc1.weight", "head.mlp.inp.1.weight", "head.log_scale"} <= grads
    assert any("lora_B" in n for n in grads) and not any("lm_head" in n for n in grads)  # B = 0 at init: A gets none yet
    old = p.snapshot()
    before = old.evaluate(obs, prompts, acted.tokens).token_log_probs
    with torch.no_grad():
        for q in (*p.proprio.parameters(), *p.head.mlp.parameters()):
            q.add_(0.1)
    assert (p.evaluate(obs, prompts, acted.tokens).token_log_probs - before).abs().max() > 1e-3
    assert torch.allclose(old.evaluate(obs, prompts, acted.tokens).token_log_probs, before, atol=1e-6)


# -- bad checkpoints and arguments: one clear line each -------------------------------------------
def _copy(tmp_path, drop=(), extra=None):
    path = tmp_path / "ckpt"
    shutil.copytree(CKPT, path)
    for name in drop:
        os.remove(path / name)
    for name, src in (extra or {}).items():
        shutil.copy(src, path / name)
    return str(path)


def _one_line(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


def test_missing_or_duplicate_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        OFTOpenVLABackbone(pretrained=_copy(tmp_path / "a", drop=["action_head--100_checkpoint.pt"]))
    _one_line(e, "pretrained=", "no action_head--*checkpoint.pt")
    head = os.path.join(CKPT, "action_head--100_checkpoint.pt")
    with pytest.raises(ValueError) as e:
        OFTOpenVLABackbone(pretrained=_copy(tmp_path / "b", extra={"action_head--200_checkpoint.pt": head}))
    _one_line(e, "2 action_head files", "action_head--100_checkpoint.pt", "action_head--200_checkpoint.pt")
    no_proprio = _copy(tmp_path / "c", drop=["proprio_projector--100_checkpoint.pt"])
    assert not OFTOpenVLABackbone(pretrained=no_proprio).uses_proprio  # null: the files decide
    with pytest.raises(FileNotFoundError) as e:
        OFTOpenVLABackbone(pretrained=no_proprio, proprio=True)
    _one_line(e, "proprio=True", "no proprio_projector--*checkpoint.pt")
    with pytest.raises(ValueError) as e:
        OFTOpenVLABackbone(pretrained=CKPT, num_images=3)
    _one_line(e, "num_images=3")


def test_inconsistent_files(tmp_path):
    bb = OFTOpenVLABackbone(pretrained=CKPT)
    with pytest.raises(ValueError) as e:
        OFTPolicy(bb, chunk_size=8, action_dim=6)
    _one_line(e, "action_dim=6", "action_head--100_checkpoint.pt", "7-D action head")
    with pytest.raises(ValueError) as e:
        OFTPolicy(bb, chunk_size=8, action_dim=7, head_hidden=64)
    _one_line(e, "head_hidden=64", "has 16")
    # a head / projector of another model (another LLM width)
    state = torch.load(os.path.join(CKPT, "action_head--100_checkpoint.pt"))
    state = {k: torch.cat([v, v], 0) if k.endswith("layer_norm1.weight") or k.endswith("layer_norm1.bias")
             else torch.cat([v, v], 1) if k.endswith("fc1.weight") else v for k, v in state.items()}
    path = _copy(tmp_path / "a")
    torch.save(state, os.path.join(path, "action_head--100_checkpoint.pt"))
    with pytest.raises(ValueError) as e:
        OFTPolicy(OFTOpenVLABackbone(pretrained=path), chunk_size=8, action_dim=7)
    _one_line(e, "input width 224 != action_dim 7 x the VLA's width 16")
    path = _copy(tmp_path / "b")
    torch.save({"module.fc1.weight": torch.zeros(32, 8)}, os.path.join(path, "proprio_projector--100_checkpoint.pt"))
    with pytest.raises(ValueError) as e:
        OFTPolicy(OFTOpenVLABackbone(pretrained=path), chunk_size=8, action_dim=7)
    _one_line(e, "proprio_projector--100_checkpoint.pt", "OFT's proprio projector has")
    # statistics: no proprio entry; several datasets and no unnorm_key
    stats = json.load(open(os.path.join(CKPT, "dataset_statistics.json")))
    path = _copy(tmp_path / "c")
    json.dump({"libero_goal_no_noops": {"action": stats["libero_goal_no_noops"]["action"]}},
              open(os.path.join(path, "dataset_statistics.json"), "w"))
    with pytest.raises(ValueError) as e:
        OFTPolicy(OFTOpenVLABackbone(pretrained=path), chunk_size=8, action_dim=7)
    _one_line(e, "norm_stats=", "no proprio statistics")
    path = _copy(tmp_path / "d")
    json.dump({**stats, "libero_10_no_noops": stats["libero_goal_no_noops"]},
              open(os.path.join(path, "dataset_statistics.json"), "w"))
    with pytest.raises(ValueError) as e:
        OFTPolicy(OFTOpenVLABackbone(pretrained=path), chunk_size=8, action_dim=7)
    _one_line(e, "unnorm_key=None", "libero_10_no_noops", "libero_goal_no_noops")


def test_bad_adapters(tmp_path):
    from safetensors.torch import load_file, save_file

    def adapter(name, config=None, drop=None, rename=None):
        path = tmp_path / name
        shutil.copytree(os.path.join(CKPT, "lora_adapter"), path)
        if config:
            c = json.load(open(path / "adapter_config.json"))
            json.dump({**c, **config}, open(path / "adapter_config.json", "w"))
        if drop or rename:
            w = load_file(path / "adapter_model.safetensors")
            w = {(rename(k) if rename else k): v for k, v in w.items() if not (drop and drop in k)}
            save_file(w, path / "adapter_model.safetensors")
        return str(path)

    key = "backbone.init_args.adapter="
    for path, parts in [
        (str(tmp_path / "none"), ["no such checkpoint directory"]),
        (adapter("dora", {"use_dora": True}), ["use_dora=True is not supported"]),
        (adapter("half", drop="projector.fc1.lora_B"), ["lora_A but not both matrices", "projector.fc1"]),
        (adapter("foreign", rename=lambda k: k.replace("projector.fc1", "projector.fc9")),
         ["adapts weights the checkpoint does not have", "projector.fc9.weight"]),
    ]:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            OFTOpenVLABackbone(pretrained=CKPT, adapter=path)
        _one_line(e, key, *parts)
    with pytest.raises(ValueError) as e:
        OFTOpenVLABackbone(config={"seed": 0}, adapter=os.path.join(CKPT, "lora_adapter"))
    _one_line(e, "adapter=", "needs", "pretrained")


def test_an_env_without_the_wrist_camera_is_one_clear_error(policies):
    p = policies["two_images_proprio"]
    td = TensorDict({"observation": {"image": OBS["image"][:2], "state": OBS["state"][:2]}}, batch_size=[2])
    with pytest.raises(KeyError) as e:
        p.observation(td)
    _one_line(e, "num_images=2", "wrist_image", "wrist_camera: true")
