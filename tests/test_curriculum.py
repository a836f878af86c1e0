"""The success curriculum: weights = the formula on a hand-made history, sampling frequencies
match the weights, and the state survives torch.save/load and a Lightning checkpoint."""
import math

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from datamodules.curriculum import SuccessCurriculum

KEYS = [(0, 0), (0, 1), (1, 0), (1, 1)]


def _hand_made(**kw):
    cur = SuccessCurriculum(KEYS, window=4, target=0.5, temperature=0.25, floor=0.1, **kw)
    cur.update([(0, 0)] * 4, [1, 1, 1, 1])  # p = 1
    cur.update([(0, 1)] * 4, [True, False, True, False])  # p = 0.5
    cur.update([(1, 0)] * 6, torch.tensor([1, 1, 0, 0, 0, 1]))  # window 4: last [0, 0, 0, 1] -> p = 0.25
    return cur  # (1, 1) never tried: p = target = 0.5


def test_weights_equal_the_formula():
    cur = _hand_made()
    assert cur.success_rates().tolist() == [1.0, 0.5, 0.25, 0.5]
    # w = max(0.1, exp(-|p - 0.5| / 0.25)) = [e^-2, 1, e^-1, 1] = [0.135335, 1, 0.367879, 1]
    total = math.exp(-2) + 1 + math.exp(-1) + 1  # 2.503214724
    expected = [0.13533528 / total, 1 / total, 0.36787944 / total, 1 / total]
    assert cur.weights().tolist() == pytest.approx(expected, abs=1e-7)
    assert cur.weights().tolist() == pytest.approx([0.0540646, 0.3994863, 0.1469627, 0.3994863], abs=1e-6)
    # a colder curriculum hits the floor: exp(-0.5 / 0.1) = 0.0067 and exp(-0.25 / 0.1) = 0.082 < 0.1
    cold = SuccessCurriculum(KEYS, window=4, temperature=0.1, floor=0.1)
    cold.load_state_dict(_hand_made().state_dict())
    assert cold.weights().tolist() == pytest.approx([0.1 / 2.2, 1 / 2.2, 0.1 / 2.2, 1 / 2.2], abs=1e-7)


def test_sampling_frequencies_match_the_weights():
    cur = _hand_made()
    draws = cur.sample(20_000, generator=torch.Generator().manual_seed(0))
    freq = [draws.count(k) / len(draws) for k in KEYS]
    for f, w in zip(freq, cur.weights().tolist(), strict=True):
        assert abs(f - w) < 0.01
    # the generator makes sampling reproducible
    first = cur.sample(50, torch.Generator().manual_seed(3))
    assert first == cur.sample(50, torch.Generator().manual_seed(3))


def test_torch_save_round_trip(tmp_path):
    cur = _hand_made()
    torch.save(cur.state_dict(), tmp_path / "cur.pt")
    back = SuccessCurriculum(window=4, target=0.5, temperature=0.25, floor=0.1)
    back.load_state_dict(torch.load(tmp_path / "cur.pt", weights_only=True))
    assert back.keys == KEYS and back.state_dict() == cur.state_dict()
    assert torch.equal(back.weights(), cur.weights())
    back.update([(0, 1)], [1])  # the window still applies after loading: [0, 1, 0, 1]
    assert back.success_rates()[1].item() == 0.5 and len(back.history[(0, 1)]) == 4


class CurriculumDataModule(BoringDataModule):
    """A datamodule owning a curriculum, checkpointed through its state_dict (as the on-policy
    datamodule would do it)."""

    def __init__(self):
        super().__init__()
        self.curriculum = SuccessCurriculum(window=4, target=0.5, temperature=0.25, floor=0.1)

    def state_dict(self):
        return {"curriculum": self.curriculum.state_dict()}

    def load_state_dict(self, state):
        self.curriculum.load_state_dict(state["curriculum"])


def test_lightning_checkpoint_round_trip(tmp_path):
    def trainer(steps):
        return Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                       default_root_dir=str(tmp_path))

    dm = CurriculumDataModule()
    dm.curriculum.load_state_dict(_hand_made().state_dict())
    t = trainer(1)
    t.fit(BoringModel(), datamodule=dm)
    ckpt = str(tmp_path / "boring.ckpt")
    t.save_checkpoint(ckpt)
    resumed = CurriculumDataModule()
    assert resumed.curriculum.keys == []
    trainer(2).fit(BoringModel(), datamodule=resumed, ckpt_path=ckpt)
    assert resumed.curriculum.state_dict() == _hand_made().state_dict()
    assert torch.equal(resumed.curriculum.weights(), _hand_made().weights())
