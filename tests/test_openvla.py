"""The kit's OpenVLA ("Prismatic") implementation and loader, on a tiny
checkpoint in OpenVLA's own on-disk format: timm/prismatic parameter names
(sharded safetensors, the language model in bf16), config.json with Prismatic fields and
norm_stats, a Llama-layout tokenizer. The loaded model is checked for exact logits against
an independent plain-torch implementation that reads the checkpoint's tensors by those names."""
import glob
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_train_cases, small_config
from helpers.openvla_checkpoint import DINO, N_PATCHES, NORM_STATS, SIGLIP, TEXT, write_checkpoint
from safetensors.torch import load_file, save_file

from modules.policy import OpenVLABackbone, TokenVLAPolicy

INSTRUCTION = "Go to the red ball"
PROMPT_PIECES = ["▁In", ":", "▁What", "▁action", "▁should", "▁the", "▁robot", "▁take", "▁to", "▁go", "▁to",
                 "▁the", "▁red", "▁ball", "?", "<0x0A>", "Out", ":"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("openvla-tiny"))
    write_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def backbone(ckpt):
    return OpenVLABackbone(pretrained=ckpt)


# -- an independent implementation, reading the checkpoint's tensors by their OpenVLA names ------
def _state(path: str) -> dict:
    return {k: v.float() for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))) for k, v in load_file(f).items()}


def ref_vit(sd: dict, prefix: str, spec: dict, x: torch.Tensor) -> torch.Tensor:
    """timm ViT: patches + pos_embed (patches only), then [class, registers] prepended; the
    blocks up to the second-to-last; prefix tokens dropped."""
    d, h = spec["hidden_size"], spec["heads"]
    x = F.conv2d(x, sd[prefix + "patch_embed.proj.weight"], sd[prefix + "patch_embed.proj.bias"],
                 stride=spec["patch_size"]).flatten(2).transpose(1, 2) + sd[prefix + "pos_embed"]
    b = x.shape[0]
    if spec["kind"] == "dinov2":
        x = torch.cat([sd[prefix + "cls_token"].expand(b, -1, -1), sd[prefix + "reg_token"].expand(b, -1, -1), x], 1)
    n = x.shape[1]
    for i in range(spec["depth"] - 1):
        p = f"{prefix}blocks.{i}."
        y = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(
            b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), -1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]) * sd.get(p + "ls1.scale_factor", 1.0)
        y = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + y * sd.get(p + "ls2.scale_factor", 1.0)
    return x[:, n - N_PATCHES:]


def ref_llama(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Llama-2 over embeddings [B, L, H] at positions 0..L-1 -> logits."""
    b, length, h = x.shape
    nh = TEXT["num_attention_heads"]
    hd = h // nh
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(length).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    def rms(t, w):
        return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6))

    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(TEXT["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        y = rms(x, sd[p + "input_layernorm.weight"])
        q, k, v = (F.linear(y, sd[p + f"self_attn.{n}_proj.weight"]).view(b, length, nh, hd).transpose(1, 2)
                   for n in "qkv")
        a = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd) + causal, -1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(b, length, h), sd[p + "self_attn.o_proj.weight"])
        y = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + F.linear(F.silu(F.linear(y, sd[p + "mlp.gate_proj.weight"])) * F.linear(y, sd[p + "mlp.up_proj.weight"]),
                         sd[p + "mlp.down_proj.weight"])
    return F.linear(rms(x, sd["language_model.model.norm.weight"]), sd["language_model.lm_head.weight"])


def ref_openvla(sd: dict, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """OpenVLA's forward: text ids without image tokens; the projected patches go after BOS."""
    feats = torch.cat([ref_vit(sd, "vision_backbone.featurizer.", DINO, pixel_values[:, :3]),
                       ref_vit(sd, "vision_backbone.fused_featurizer.", SIGLIP, pixel_values[:, 3:])], -1)
    for i, act in ((1, F.gelu), (2, F.gelu), (3, None)):
        feats = F.linear(feats, sd[f"projector.fc{i}.weight"], sd[f"projector.fc{i}.bias"])
        feats = act(feats) if act else feats
    emb = sd["language_model.model.embed_tokens.weight"][input_ids]
    return ref_llama(sd, torch.cat([emb[:, :1], feats, emb[:, 1:]], 1))


def _images(n: int, size: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# -- (a) loading --------------------------------------------------------------------------------
def test_loader_reads_openvla_format(ckpt, backbone):
    model = backbone.model
    assert type(model).__name__ == "PrismaticForActionPrediction"
    assert model.get_output_embeddings().weight.shape == (32064, 32) and backbone.vocab_size == 32064
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 shard -> fp32 by default
    blocks = model.model.vision_backbone.featurizer.encoder.layer
    assert len(blocks) == DINO["depth"] - 1  # features from the second-to-last block: the last is not built
    sd = _state(ckpt)
    qkv = sd["vision_backbone.featurizer.blocks.1.attn.qkv.weight"]
    assert torch.equal(blocks[1].attention.k_proj.weight, qkv[16:32])  # rows [q; k; v]
    assert torch.equal(blocks[0].layer_scale2.lambda1, sd["vision_backbone.featurizer.blocks.0.ls2.scale_factor"])
    pos = model.model.vision_backbone.featurizer.embeddings.position_embeddings
    assert pos.shape == (1, 1 + N_PATCHES, 16) and not pos[0, 0].any()  # timm: no position for class/registers
    tok = backbone.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 2, 32000, 32000)
    assert tok.convert_ids_to_tokens([29871, 13]) == ["▁", "<0x0A>"]
    bf16 = OpenVLABackbone(pretrained=ckpt, dtype="bfloat16").model
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


@pytest.mark.parametrize("kwargs,error,key", [
    ({"pretrained": "/no/such/openvla"}, FileNotFoundError, "backbone.init_args.pretrained"),
    ({"pretrained": "openvla/openvla-7b"}, ValueError, "never downloads"),
    ({}, ValueError, "backbone.init_args.pretrained"),
    ({"config": {"layerz": 1}}, ValueError, "backbone.init_args.config.layerz"),
    ({"config": {}, "dtype": "fp8"}, ValueError, "backbone.init_args.dtype"),
])
def test_bad_arguments_one_clear_error(kwargs, error, key):
    with pytest.raises(error) as info:
        OpenVLABackbone(**kwargs)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_with_a_foreign_parameter_is_rejected(ckpt, tmp_path):
    for name in os.listdir(ckpt):
        os.symlink(os.path.join(ckpt, name), tmp_path / name)
    os.remove(tmp_path / "model-00001-of-00002.safetensors")
    shard = load_file(os.path.join(ckpt, "model-00001-of-00002.safetensors"))
    shard["vision_backbone.featurizer.blocks.0.attn.q_norm.weight"] = torch.ones(8)
    save_file(shard, tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"pretrained=.*unknown \['vision_backbone.featurizer.blocks.0.attn.q_norm"):
        OpenVLABackbone(pretrained=str(tmp_path))


def test_dino_attention_under_older_transformers_names():
    """transformers before ~5.2x names DINOv2's attention as v4 did; the loader maps to whichever exists."""
    from modules.policy.openvla.checkpoint import convert_all
    from modules.policy.openvla.config import TowerSpec

    qkv = torch.randn(48, 16)
    legacy = "model.vision_backbone.featurizer.encoder.layer.0.attention.attention.key.weight"
    expected = {legacy: None, "model.vision_backbone.featurizer.embeddings.mask_token": torch.zeros(1, 16)}
    state, unknown = convert_all([("vision_backbone.featurizer.blocks.0.attn.qkv.weight", qkv)],
                                 [TowerSpec(**DINO), TowerSpec(**SIGLIP)], expected)
    assert not unknown and torch.equal(state[legacy], qkv[16:32])


# -- (b) exact equivalence with the independent implementation --------------------------------
def test_logits_equal_the_reference_implementation(ckpt, backbone):
    sd = _state(ckpt)
    instructions = [INSTRUCTION, "go to the red ball and then pick up the green key"]  # left padding on row 0
    prompts = backbone.encode(instructions)
    images = _images(2)
    pixels = backbone.preprocess(images)
    with torch.no_grad():
        logits = backbone.model(input_ids=prompts.input_ids, pixel_values=pixels,
                                attention_mask=prompts.attention_mask,
                                position_ids=(prompts.attention_mask.cumsum(-1) - 1).clamp_min(0)).logits
    for row, text in enumerate(instructions):
        ids = backbone.tokenizer(backbone.prompt(text))["input_ids"] + [29871]  # OpenVLA: BOS, prompt, 29871
        ref = ref_openvla(sd, torch.tensor([ids]), pixels[row:row + 1])
        assert ref.shape == (1, 1 + N_PATCHES + len(ids) - 1, 32064)
        kit = logits[row, -ref.shape[1]:]
        assert ref.abs().max() > 1.0  # logits of a real scale, not ~0
        assert torch.allclose(kit, ref[0], atol=1e-5, rtol=0), (kit - ref[0]).abs().max()


# -- (c) the contract, by hand ------------------------------------------------------------------
def test_prompt_ids_and_sequence_layout(backbone):
    vocab = backbone.tokenizer.get_vocab()
    assert vocab["<0x0A>"] == 13 and vocab["▁"] == 29871
    enc = backbone.encode([INSTRUCTION])
    ids = enc.input_ids[0].tolist()
    placeholder = backbone.image_token_id
    assert ids == [1] + [placeholder] * N_PATCHES + [vocab[p] for p in PROMPT_PIECES] + [29871]
    goal = [p for p, g in zip(PROMPT_PIECES, enc.goal_mask[0, 1 + N_PATCHES:].tolist()) if g]
    assert goal == ["▁go", "▁to", "▁the", "▁red", "▁ball"]  # emb(g): the instruction's own tokens
    assert enc.image_mask[0].nonzero().flatten().tolist() == list(range(1, 1 + N_PATCHES))
    assert placeholder == 32001 and placeholder >= backbone.tokenizer.vocab_size  # a never-trained padding row
    mixed = backbone.encode([INSTRUCTION, INSTRUCTION + " now"])
    assert mixed.input_ids[0, 0] == 32000 and mixed.attention_mask[0, 0] == 0  # left padding with <PAD>
    assert mixed.image_mask.sum(1).tolist() == [N_PATCHES, N_PATCHES]


def test_pixel_values_six_channels_by_hand(backbone):
    image = torch.zeros(1, 3, 28, 28, dtype=torch.uint8)
    image[0, :, 3, 5] = torch.tensor([255, 0, 128])
    px = backbone.preprocess(image)
    assert px.shape == (1, 6, 28, 28) and px.dtype == torch.float32
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225,  # DINOv2: ImageNet
                (1 - 0.5) / 0.5, (0 - 0.5) / 0.5, (128 / 255 - 0.5) / 0.5]  # SigLIP: 0.5 / 0.5
    assert torch.allclose(px[0, :, 3, 5], torch.tensor([2.2489083, -2.0357143, 0.4264923, 1.0, -1.0, 0.0039216]),
                          atol=1e-6)
    assert torch.allclose(px[0, :, 3, 5], torch.tensor(expected), atol=1e-6)
    flat = torch.full((1, 3, 56, 56), 200, dtype=torch.uint8)  # resized straight to 28 x 28
    out = backbone.preprocess(flat)
    assert out.shape == (1, 6, 28, 28) and torch.allclose(out[0, 3], torch.full((28, 28), 200 / 255 * 2 - 1))


def test_resize_is_openvlas_processor(backbone):
    """A frame that is not S x S: OpenVLA's processor resizes the PIL image (torchvision's resize on a
    PIL image: Image.resize BICUBIC, two passes rounded to uint8 in between), then /255 and the two
    towers' normalisations; a float bicubic resize rounded once differs from it."""
    from PIL import Image

    frame = torch.randint(0, 256, (1, 3, 61, 47), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    s = backbone.image_size
    resized = np.asarray(Image.fromarray(frame[0].permute(1, 2, 0).numpy()).resize((s, s), Image.BICUBIC))
    x = torch.from_numpy(resized).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406, 0.5, 0.5, 0.5]).view(6, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225, 0.5, 0.5, 0.5]).view(6, 1, 1)
    assert torch.allclose(backbone.preprocess(frame)[0], (torch.cat([x, x]) - mean) / std, atol=1e-6)
    once = F.interpolate(frame.float(), size=(s, s), mode="bicubic", antialias=True,
                         align_corners=False).round().clamp(0, 255)
    assert (once[0] != torch.from_numpy(resized).permute(2, 0, 1).float()).any()


def test_action_logits_are_at_minus_9_to_minus_2_and_denormalise(ckpt, backbone):
    """Teacher-forced prompt + 29871 + 7 actions + </s>: the action logits are logits[:, -9:-2];
    the kit's policy reads the same positions; the codec de-normalises with q01/q99 and the mask."""
    policy = TokenVLAPolicy(backbone, action_tokens=7, action_bins=256, norm_stats=ckpt,
                            unnorm_key="libero_goal_no_noops")
    assert policy.action_ids[0] == 31744 and policy.action_ids[-1] == 31999
    tokens = torch.tensor([[0, 128, 255, 0, 128, 255, 128]])  # bin offsets: id = 31744 + k
    image = _images(1, seed=3)
    ids = backbone.tokenizer(backbone.prompt(INSTRUCTION))["input_ids"] + [29871] + (31744 + tokens[0]).tolist() + [2]
    ref = ref_openvla(_state(ckpt), torch.tensor([ids]), backbone.preprocess(image))
    ref_logp = torch.log_softmax(ref[:, -9:-2, 31744:32000], -1)  # over the action tokens, T = 1
    kit = policy.evaluate(image, policy.encode([INSTRUCTION]), tokens).token_log_probs
    assert torch.allclose(kit, ref_logp, atol=1e-5)
    # id 31744 -> bin 254 (centre 254/255), 31872 -> bin 127 (centre 0), 31999 -> bin 0 (-254/255)
    v = torch.tensor([254, 0, -254, 254, 0, -254, 0], dtype=torch.float64) / 255
    q01, q99 = (torch.tensor(NORM_STATS["libero_goal_no_noops"]["action"][k], dtype=torch.float64) for k in ("q01", "q99"))
    expected = 0.5 * (v + 1) * (q99 - q01) + q01
    expected[6] = v[6]  # the gripper (mask false) keeps its normalised value
    assert torch.allclose(policy.env_action(tokens)[0].double(), expected, atol=1e-6)
    assert abs(expected[0].item() - (0.5 * (509 / 255) * 2.0 - 0.5)) < 1e-12  # 1.4961 by hand


# -- (d) the kit's policy on the OpenVLA backbone -----------------------------------------------
def test_act_log_probs_equal_evaluate(backbone):
    policy = TokenVLAPolicy(backbone, action_tokens=7, action_bins=256, temperature=1.6)
    images = _images(3, size=56, seed=5)  # resized to 28
    prompts = policy.encode([INSTRUCTION, "pick up the blue box", INSTRUCTION])
    torch.manual_seed(0)
    acted = policy.act(images, prompts)
    trained = policy.evaluate(images, prompts, acted.tokens)
    assert acted.tokens.shape == (3, 7) and ((acted.tokens >= 0) & (acted.tokens < 256)).all()
    assert torch.allclose(acted.log_prob, trained.log_prob, atol=1e-5)
    assert torch.allclose(acted.token_log_probs, trained.token_log_probs, atol=1e-5)
    assert torch.allclose(acted.phi, trained.phi, atol=1e-5) and torch.allclose(acted.emb, trained.emb, atol=1e-5)


def test_every_trainable_parameter_gets_a_gradient():
    from modules.critics import GoalConditionedCritic

    policy = TokenVLAPolicy(OpenVLABackbone(config={"seed": 0, "words": [INSTRUCTION]}), action_tokens=2,
                            action_bins=5)
    out = policy.evaluate(_images(2, size=56), policy.encode([INSTRUCTION, "open the door"]),
                          torch.tensor([[0, 1], [2, 3]]))
    critic = GoalConditionedCritic(policy.feature_dim, [8])
    (out.log_prob.sum() + out.entropy.sum() + critic(out.phi, out.emb).sum()).backward()
    missing = [n for n, p in policy.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert [n for n, p in policy.named_parameters() if not p.requires_grad] == [
        "backbone.model.model.vision_backbone.featurizer.embeddings.mask_token"]


def test_lora_applies_everywhere_but_the_lm_head(ckpt):
    torch.manual_seed(0)
    policy = TokenVLAPolicy(OpenVLABackbone(pretrained=ckpt), action_tokens=7, action_bins=256,
                            lora={"r": 4, "alpha": 8, "target_modules": "all-linear"})
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for part in ("featurizer.encoder.layer.0.attention.q_proj", "fused_featurizer.encoder.layers.0.self_attn.v_proj",
                 "projector.fc1", "language_model.layers.1.mlp.down_proj"):
        assert any(part + ".lora_A" in n for n in trainable), part
    assert not any("lm_head" in n for n in trainable)
    images, prompts = _images(2, seed=7), policy.encode([INSTRUCTION, "open the door"])
    base = policy.evaluate(images, prompts, torch.zeros(2, 7, dtype=torch.long)).log_prob.detach()
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    acted = policy.act(images, prompts)
    trained = policy.evaluate(images, prompts, acted.tokens)
    assert torch.allclose(acted.log_prob, trained.log_prob, atol=1e-5)
    assert (policy.evaluate(images, prompts, torch.zeros(2, 7, dtype=torch.long)).log_prob - base).abs().max() > 1e-3


# -- (e) train.py end to end --------------------------------------------------------------------
@pytest.fixture(scope="module")
def openvla_runs(tmp_path_factory):
    """Both runs, each its own train.py process (forked after the imports): {ablation: (dir, result)}."""
    cases = [None, "seq_ft"]
    runs = run_train_cases(tmp_path_factory, cases, lambda ablation, d: (
        "--config", small_config(d, ablation or "crl", iterations=1, tasks=2, ablation=ablation),
        "--config", os.path.join(ROOT, "configs", "policies", "openvla_tiny.yaml")), timeout=900)
    return dict(zip(cases, runs))


@pytest.mark.slow
@pytest.mark.parametrize("ablation", [None, "seq_ft"])
def test_train_cli_with_tiny_openvla(openvla_runs, ablation):
    name = ablation or "crl"
    tmp_path, res = openvla_runs[ablation]
    assert res.returncode == 0, res.stderr[-3000:]
    paths = glob.glob(str(tmp_path / "runs" / name / "version_*" / "metrics.json"))
    assert paths, "no metrics.json"
    with open(paths[0]) as f:
        m = json.load(f)
    assert m["complete"] and len(m["R"]) == 2 and all(0.0 <= r <= 1.0 for row in m["R"] for r in row)
    ckpt = torch.load(os.path.join(os.path.dirname(paths[0]), "checkpoints", "task1_end.ckpt"), weights_only=False)
    assert ckpt["crl"]["has_anchor"] == (ablation is None)
    assert ckpt["state_dict"]["policy.backbone.model.lm_head.weight"].shape == (32064, 32)
