"""The grounding-pretrained tiny VLM: labels, a short pretraining, the committed checkpoint and
how a TinyLlava loads it."""
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from pretrain_tiny_vlm import (ALL_OBJECTS, NOT_IN_VIEW, Grounder, backbone_config,  # noqa: E402
                               cell_classes, grounding_data, pretrain)

from datamodules.babyai import _TileRenderer  # noqa: E402
from modules.policy.tiny_llava import TinyLlava  # noqa: E402

CHECKPOINT = os.path.join(ROOT, "checkpoints", "tiny_llava_babyai.pt")
KEY = "model.policy.init_args.backbone.init_args"


def test_labels_name_the_patch_that_shows_the_object():
    """Emptying the labelled cell changes exactly the pixels of that 8x8 patch; cell classes
    agree with the grounding labels."""
    views, names, cells = grounding_data(300, seed=5)
    render = _TileRenderer(8)
    frames = render(views).astype(int)
    classes = cell_classes(views)
    visible = 0
    for i, cell in enumerate(cells.tolist()):
        if cell == NOT_IN_VIEW:
            assert (2 + ALL_OBJECTS.index(names[i])) not in classes[i].tolist()
            continue
        visible += 1
        y, x = divmod(cell, 7)
        emptied = views[i].copy()
        emptied[x, y] = (1, 0, 0)  # minigrid's "empty"
        changed = np.nonzero((render(emptied[None])[0].astype(int) != frames[i]).any(0))
        assert {r // 8 for r in changed[0]} == {y} and {c // 8 for c in changed[1]} == {x}
        assert classes[i, cell] == 2 + ALL_OBJECTS.index(names[i])
    assert 50 < visible < 300  # both kinds of answer occur


def test_a_short_pretraining_learns_what_each_cell_holds():
    torch.manual_seed(0)
    backbone = TinyLlava(**backbone_config())
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    _, history = pretrain(backbone, steps=120, pool=3000, batch_size=64, log=lambda *a, **k: None)
    # per-cell classification over 20 classes: from ~log(20) = 3.0 to well under half of it
    assert history["what_loss_first"] > 2.0 and history["what_loss_last"] < 0.5 * history["what_loss_first"]
    assert "prompt" not in vars(backbone)  # the question template was this pretraining's only
    changed = [k for k, v in backbone.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("model.vision_tower") for k in changed)
    assert any(k.startswith("model.language_model") for k in changed)


@pytest.fixture(scope="module")
def saved():
    return torch.load(CHECKPOINT, map_location="cpu", weights_only=True)


def test_committed_checkpoint_grounds_objects_on_fresh_frames(saved):
    backbone = TinyLlava(**backbone_config(), checkpoint=CHECKPOINT)
    grounder = Grounder(backbone)
    grounder.load_state_dict({**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                              **saved["pretraining_heads"]})
    views, names, cells = grounding_data(500, seed=12345)  # not the pretraining's seed
    with torch.no_grad():
        where, _ = grounder(torch.from_numpy(_TileRenderer(8)(views)), names)
    accuracy = (where.argmax(-1) == cells).float().mean().item()
    majority = (cells == NOT_IN_VIEW).float().mean().item()
    assert accuracy >= 0.95 and majority < 0.7, (accuracy, majority)
    assert saved["pretraining"]["accuracy_after"] >= 0.95


def test_loading_replaces_every_weight_and_checks_the_architecture(saved, tmp_path):
    a = TinyLlava(**backbone_config(), checkpoint=CHECKPOINT, seed=1)
    b = TinyLlava(**backbone_config(), checkpoint=CHECKPOINT, seed=2)  # different random init first
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]) and torch.equal(v, saved["state_dict"][k]), k
    # the vocabulary is a set of words: any grouping of the same words loads
    words = [" ".join(w for s in backbone_config()["words"] for w in s.split())]
    TinyLlava(**backbone_config(words=words), checkpoint=CHECKPOINT)
    with pytest.raises(ValueError, match=rf"{KEY}.hidden_size=64: the checkpoint .* was built with 32"):
        TinyLlava(**backbone_config(hidden_size=64), checkpoint=CHECKPOINT)
    with pytest.raises(ValueError, match=rf"{KEY}.words="):
        TinyLlava(**backbone_config(words=["go to the red ball"]), checkpoint=CHECKPOINT)
    missing = str(tmp_path / "none.pt")
    with pytest.raises(FileNotFoundError, match=rf"{KEY}.checkpoint='{missing}': no such file"):
        TinyLlava(**backbone_config(), checkpoint=missing)
