"""The OpenVLA exporter is the inverse of the OpenVLA loader: a model written by
``save_checkpoint`` loads back (``OpenVLABackbone(pretrained=...)``) with identical weights,
tokenizer and action logits."""
import json
import os

import pytest
import torch

from modules.policy import OpenVLABackbone, TokenVLAPolicy
from modules.policy.openvla.export import openvla_state_dict, save_checkpoint

TINY = {"words": ["put the bowl on the plate"], "image_size": 28, "patch_size": 7, "vision_hidden_size": 16,
        "vision_depth": 3, "vision_heads": 2, "registers": 4, "hidden_size": 16, "layers": 2, "heads": 2, "seed": 3}
STATS = {"demo_key": {"action": {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export"))
    backbone = OpenVLABackbone(config=TINY)
    with torch.no_grad():  # move every weight off its init so a dropped tensor would show
        for p in backbone.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(backbone.model, backbone.tokenizer, path, STATS)
    return backbone, path


def test_round_trip_weights_and_tokenizer(exported):
    original, path = exported
    loaded = OpenVLABackbone(pretrained=path)
    want, got = original.model.state_dict(), loaded.model.state_dict()
    dino = "model.vision_backbone.featurizer.embeddings."
    assert set(want) == set(got)
    for k in set(want) - {dino + "mask_token", dino + "cls_token", dino + "position_embeddings"}:
        assert torch.equal(want[k], got[k]), k
    # the class row of DINOv2's position embeddings is folded into the class token (their sum enters the ViT)
    assert torch.equal(got[dino + "position_embeddings"][:, 1:], want[dino + "position_embeddings"][:, 1:])
    assert torch.equal(got[dino + "cls_token"] + got[dino + "position_embeddings"][:, :1],
                       want[dino + "cls_token"] + want[dino + "position_embeddings"][:, :1])
    text = "put the bowl on the plate"
    assert loaded.encode([text]).input_ids.tolist() == original.encode([text]).input_ids.tolist()


def test_round_trip_logits_and_norm_stats(exported):
    original, path = exported
    policies = [TokenVLAPolicy(b, action_tokens=7, action_bins=256, norm_stats=path, unnorm_key="demo_key")
                for b in (original, OpenVLABackbone(pretrained=path))]
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    tokens = torch.randint(0, 256, (2, 7))
    outs = [p.evaluate(images, p.encode(["put the bowl on the plate"] * 2), tokens) for p in policies]
    assert torch.allclose(outs[0].token_log_probs, outs[1].token_log_probs, atol=1e-6)
    assert torch.equal(policies[0].env_action(tokens), policies[1].env_action(tokens))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["norm_stats"] == STATS and config["model_type"] == "openvla"
    assert [t["depth"] for t in config["kit_vision_towers"]] == [3, 3]


def test_names_are_openvla_s(exported):
    names = set(openvla_state_dict(exported[0].model))
    assert "vision_backbone.featurizer.blocks.0.attn.qkv.weight" in names
    assert "vision_backbone.featurizer.blocks.1.ls2.scale_factor" in names
    assert "vision_backbone.fused_featurizer.pos_embed" in names
    assert "language_model.lm_head.weight" in names
    assert not any(".blocks.2." in n for n in names)  # the last block is never built


@pytest.mark.parametrize("proprio", [False, True])
def test_oft_policy_exports_as_an_openvla_oft_folder(tmp_path, proprio):
    """An OFT policy trained in the kit (here: weights moved off their init) exports to an OpenVLA-OFT
    folder that main's OFT loader reads: the same greedy chunk, log-probs and env actions."""
    from modules.policy import OFTOpenVLABackbone
    from modules.policy.export import HEAD_FILE, PROPRIO_FILE, export_policy
    from modules.policy.oft_vla import OFTPolicy

    torch.manual_seed(0)
    kw = dict(chunk_size=4, action_dim=7, head_hidden=24, head_blocks=2, init_scale=0.1, unnorm_key="demo_key")
    stats = {"demo_key": {**STATS["demo_key"], "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8, "mask": [True] * 8}}}
    backbone = OFTOpenVLABackbone(config=TINY, num_images=1, proprio=proprio)
    stats_file = tmp_path / "stats.json"
    stats_file.write_text(json.dumps(stats))
    trained = OFTPolicy(backbone, norm_stats=str(stats_file), **kw)
    with torch.no_grad():  # what SFT moves (not OFT's zero action placeholders, nor the Laplace scale)
        for name, p in trained.named_parameters():
            if p.requires_grad and name != "head.log_scale":
                p.add_(0.01 * torch.randn_like(p))
    path = str(tmp_path / "policy")
    export_policy(trained, path, stats)
    files = set(os.listdir(path))
    assert HEAD_FILE in files and (PROPRIO_FILE in files) == proprio
    loaded = OFTPolicy(OFTOpenVLABackbone(pretrained=path, num_images=1), norm_stats=path, **kw)
    assert loaded.backbone.uses_proprio == proprio
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    if proprio:
        from tensordict import TensorDict

        images = TensorDict({"image": images, "state": torch.randn(2, 8)}, batch_size=[2])
    prompts = ["put the bowl on the plate"] * 2
    a, b = (p.act(images, p.encode(prompts), greedy=True) for p in (trained, loaded))
    assert torch.allclose(a.tokens, b.tokens, atol=1e-5)
    assert torch.allclose(a.log_prob, b.log_prob, atol=1e-4)  # the Laplace scale: init_scale in both
    assert torch.allclose(trained.env_action(a.tokens), loaded.env_action(b.tokens), atol=1e-5)


def test_oft_export_refuses_what_oft_s_format_cannot_hold(tmp_path):
    from modules.policy.export import export_policy
    from modules.policy.oft_vla import OFTPolicy

    policy = OFTPolicy(OpenVLABackbone(config=TINY), chunk_size=2, learned_slots=True)
    with pytest.raises(ValueError, match=r"learned_slots=true: OFT's checkpoint format"):
        export_policy(policy, str(tmp_path / "policy"))
    assert not os.path.exists(tmp_path / "policy")
