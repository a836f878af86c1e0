"""VLA-RL's curriculum: sample tasks / initial states whose recent success is near a target.

VLA-RL samples the (task, initial state) pairs whose recent success rate is near 0.5 (no
curriculum: 88.0 vs 90.2 on LIBERO-Spatial) but gives no formula; this kit uses

    p_k = mean of the last ``window`` outcomes of key k (a key never tried: p_k = target)
    w_k = max(floor, exp(-|p_k - target| / temperature)),   P(k) = w_k / sum_j w_j

so keys at the target get weight 1, solved or hopeless ones decay to ``floor`` (never zero:
every key is revisited, so a forgotten or newly learnable one is noticed). Keys are any
hashable values, e.g. (task_index, init_state_index).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable

import torch


class SuccessCurriculum:
    def __init__(self, keys: Iterable[Hashable] = (), window: int = 20, target: float = 0.5,
                 temperature: float = 0.2, floor: float = 0.05):
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"curriculum.window={window!r}: must be an integer >= 1")
        bad = [(name, value) for name, value in (("target", target), ("temperature", temperature),
                                                  ("floor", floor))
               if isinstance(value, bool) or not isinstance(value, (int, float))]
        if bad:
            raise ValueError(f"curriculum.{bad[0][0]}={bad[0][1]!r}: must be a number")
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"curriculum.target={target!r}: must be in [0, 1]")
        if temperature <= 0:
            raise ValueError(f"curriculum.temperature={temperature!r}: must be > 0")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"curriculum.floor={floor!r}: must be in (0, 1]")
        self.window, self.target, self.temperature, self.floor = window, target, temperature, floor
        self.history: dict[Hashable, deque] = {}
        self.add_keys(keys)

    @property
    def keys(self) -> list:
        return list(self.history)

    def add_keys(self, keys: Iterable[Hashable]) -> None:
        for k in keys:
            self.history.setdefault(k, deque(maxlen=self.window))

    def success_rates(self, among: Iterable[Hashable] | None = None) -> torch.Tensor:
        """p_k over the last ``window`` outcomes; ``target`` for keys with no outcome yet."""
        hist = self.history.values() if among is None else [self.history[k] for k in among]
        return torch.tensor([sum(h) / len(h) if h else self.target for h in hist], dtype=torch.float64)

    def weights(self, among: Iterable[Hashable] | None = None) -> torch.Tensor:
        """P(k) = w_k / sum w, w_k = max(floor, exp(-|p_k - target| / temperature)); over the
        keys ``among`` (e.g. one task's initial states) when given, else over all keys."""
        rates = self.success_rates(among)
        if not len(rates):
            raise ValueError("the curriculum has no keys to weigh")
        w = torch.exp(-(rates - self.target).abs() / self.temperature).clamp_min(self.floor)
        return w / w.sum()

    def sample(self, n: int, generator: torch.Generator | None = None,
               among: Iterable[Hashable] | None = None) -> list:
        """``n`` keys drawn with replacement from P(k) (restricted to ``among`` when given)."""
        keys = self.keys if among is None else list(among)
        idx = torch.multinomial(self.weights(keys), n, replacement=True, generator=generator)
        return [keys[i] for i in idx.tolist()]

    def update(self, keys: Iterable[Hashable], successes: Iterable) -> None:
        """Record one finished episode's outcome per key (unknown keys are added)."""
        keys = list(keys)
        outcomes = successes.reshape(-1).tolist() if torch.is_tensor(successes) else list(successes)
        if len(keys) != len(outcomes):
            raise ValueError(f"update: {len(keys)} keys but {len(outcomes)} outcomes")
        for k, s in zip(keys, outcomes, strict=True):
            self.add_keys([k])
            self.history[k].append(int(bool(s)))

    def stats(self) -> dict[str, float]:
        """For logging: mean recent success and the weights' effective number of keys."""
        w = self.weights()
        return {"curriculum/success_mean": float(self.success_rates().mean()),
                "curriculum/effective_keys": float(1.0 / (w ** 2).sum())}

    # -- checkpoints (Lightning: the owning datamodule's state_dict) ----------------------------
    def state_dict(self) -> dict:
        return {"keys": self.keys, "history": [list(h) for h in self.history.values()]}

    def load_state_dict(self, state: dict) -> None:
        pairs = zip(state["keys"], state["history"], strict=True)
        self.history = {k: deque(h, maxlen=self.window) for k, h in pairs}
