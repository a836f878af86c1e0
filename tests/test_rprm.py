"""The RPRM: AUROC by hand, training a tiny Llava + LoRA RPRM with the Lightning Trainer to
> 0.9 held-out accuracy on a separable dataset (label = a bright patch), reloading its weights
from the checkpoint, and the scripts/train_rprm.py entry point with configs/rprm.yaml."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, WORDS
from helpers.rprm import LORA, make_rprm
from lightning import Trainer

from datamodules.rprm_data import RPRMDataModule
from modules.vla_rl.label_store import LabelledFrames, LabelledFrameWriter
from modules.vla_rl.metrics import binary_accuracy, binary_auroc
from modules.vla_rl.rprm_module import RPRMModule, load_rprm_weights

# -- AUROC ------------------------------------------------------------------------------------
def test_auroc_hand_computed():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35 > 0.1, 0.35 < 0.4, 0.8 > both -> 3 / 4
    auroc = binary_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert auroc == pytest.approx(0.75)
    # a tie counts 1/2: pos 0.5 vs neg 0.5 (1/2) and 0.2 (1); pos 0.9 beats both -> 3.5 / 4
    auroc = binary_auroc(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([1, 0, 0, 1]))
    assert auroc == pytest.approx(0.875)
    assert binary_auroc(torch.tensor([0.1, 0.2, 0.8]), torch.tensor([0, 0, 1])) == pytest.approx(1.0)
    assert binary_auroc(torch.tensor([0.9, 0.2, 0.1]), torch.tensor([0, 1, 1])) == pytest.approx(0.0)
    assert torch.isnan(binary_auroc(torch.tensor([0.3, 0.4]), torch.tensor([1, 1])))


def test_auroc_equals_pair_counting_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=g).float()  # many ties
    labels = torch.randint(0, 2, (60,), generator=g)
    pos, neg = scores[labels == 1].tolist(), scores[labels == 0].tolist()
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert binary_auroc(scores, labels).item() == pytest.approx(pairs / (len(pos) * len(neg)))
    accuracy = binary_accuracy(torch.tensor([0.2, 0.7, 0.6]), torch.tensor([0, 1, 0]))
    assert accuracy.item() == pytest.approx(2 / 3)


# -- training on a separable dataset ---------------------------------------------------------
def bright_patch_dataset(root, episodes=40, frames=16, seed=0):
    """Dim noise frames; label 1 = a 14x14 white patch somewhere. 20% of episodes held out."""
    g = torch.Generator().manual_seed(seed)
    writer = LabelledFrameWriter(str(root), heldout_fraction=0.2, shard_size=256)
    for ep in range(episodes):
        images = torch.randint(0, 80, (frames, 3, 56, 56), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 2, (frames,), generator=g)
        for i in labels.nonzero().flatten().tolist():
            y, x = torch.randint(0, 56 - 14, (2,), generator=g).tolist()
            images[i, :, y:y + 14, x:x + 14] = 255
        writer.add(images, labels, WORDS[ep % 3], f"ep{ep}")
    return writer.close()


def test_rprm_trains_to_high_heldout_accuracy(tmp_path):
    index = bright_patch_dataset(tmp_path / "data")
    assert index["splits"]["heldout"]["frames"] == 8 * 16
    torch.manual_seed(0)
    rprm = make_rprm()
    trainable = [n for n, p in rprm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    held = LabelledFrames(str(tmp_path / "data"), "heldout")
    texts = [held.instructions[i] for i in held.data["instruction"].tolist()]
    assert binary_accuracy(rprm.score(held.data["image"], texts), held.labels).item() < 0.75  # untrained
    module = RPRMModule(rprm, lr=1e-3)
    dm = RPRMDataModule(str(tmp_path / "data"), batch_size=32)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=6, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.callback_metrics["val/accuracy"] > 0.9
    assert trainer.callback_metrics["val/auroc"] > 0.95
    # the same numbers recomputed outside the module on the held-out episodes
    probs = rprm.score(held.data["image"], texts)
    assert binary_accuracy(probs, held.labels).item() > 0.9
    logged = trainer.callback_metrics["val/auroc"].item()
    assert binary_auroc(probs, held.labels).item() == pytest.approx(logged, abs=1e-5)

    # the checkpoint holds the LoRA and the head, and a record of the frozen VLM instead of its weights
    ckpt = str(tmp_path / "rprm.ckpt")
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    keys = set(saved["state_dict"])
    assert keys == {f"rprm.{n}" for n in trainable}
    assert len(saved["frozen_base"]["tensors"]) == len(list(rprm.parameters())) - len(trainable) > 10
    # a fresh RPRM of the same config (same base, untrained LoRA and head) scores identically after
    # loading the checkpoint's weights
    fresh = make_rprm(seed=0)
    images = held.data["image"][:32]
    assert not torch.allclose(fresh.score(images, [WORDS[0]] * 32), rprm.score(images, [WORDS[0]] * 32), atol=1e-3)
    load_rprm_weights(fresh, ckpt)
    assert torch.allclose(fresh.score(images, [WORDS[0]] * 32), rprm.score(images, [WORDS[0]] * 32), atol=1e-6)
    # ... also once frozen as a whole (the reward shaping's), and resuming the module restores the base
    frozen = make_rprm(seed=0).requires_grad_(False)
    load_rprm_weights(frozen, ckpt)
    assert torch.equal(frozen.head[1].weight, rprm.head[1].weight)
    resumed = RPRMModule(make_rprm(seed=0), lr=1e-3)
    resumed.on_load_checkpoint(saved)
    resumed.load_state_dict(saved["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(resumed.rprm.state_dict().values(), rprm.state_dict().values(),
                                                 strict=True))
    # another base (other random weights): one line naming the key, nothing loaded
    other = make_rprm(seed=1)
    head = other.head[1].weight.clone()
    with pytest.raises(ValueError, match=r"^data.reward_shaping.checkpoint='.*rprm.ckpt' \(the RPRM's backbone: "
                                         r"source None\) holds a LoRA run's trainable state .* weights differ"):
        load_rprm_weights(other, ckpt)
    assert torch.equal(other.head[1].weight, head)


def test_score_is_batched_and_matches_forward():
    rprm = make_rprm()
    images = torch.randint(0, 256, (10, 3, 56, 56), dtype=torch.uint8)
    texts = [WORDS[i % 3] for i in range(10)]
    rprm.eval()
    with torch.no_grad():
        direct = torch.sigmoid(rprm(images, texts))
    assert torch.allclose(rprm.score(images, texts, batch_size=3), direct, atol=1e-6)
    # the question prompt, not the policy's: bos, 49 image tokens, then the question's words
    enc = rprm.backbone.encode([WORDS[0]])
    words = rprm.backbone.tokenizer.convert_ids_to_tokens(enc.input_ids[0].tolist())
    assert words[:50] == ["<s>"] + ["<image>"] * 49
    assert words[50:] == ["in", ":", "is", "this", "step", "completing", "a", "sub", "-", "task", "of",
                          "go", "to", "the", "red", "ball", "?", "out", ":"]
    goal = [w for w, g in zip(words, enc.goal_mask[0].tolist(), strict=True) if g]
    assert goal == ["go", "to", "the", "red", "ball"]


def test_train_rprm_script_with_the_config(tmp_path):
    bright_patch_dataset(tmp_path / "data", episodes=10, frames=8)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train_rprm.py"), "--config",
         os.path.join(ROOT, "configs", "rprm.yaml"), "--data.data_dir", str(tmp_path / "data"),
         "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
         "--model.rprm.init_args.backbone.init_args.seed", "3",  # the base make_rprm(seed=3) builds
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
         "--trainer.default_root_dir", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpts = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "runs") for f in fs if f.endswith(".ckpt")]
    assert ckpts, out.stderr[-2000:]
    rprm = load_rprm_weights(make_rprm(seed=3), ckpts[0])  # the config's model (base seed 3) = make_rprm's
    assert rprm.score(torch.zeros(2, 3, 56, 56, dtype=torch.uint8), WORDS[:2]).shape == (2,)
