"""``data.reward_shaping``: VLA-RL's process reward on every collected rollout.

    data.reward_shaping:
      rprm: {class_path: modules.vla_rl.rprm.RPRM, init_args: {...}}   # the RPRM's architecture
      checkpoint: PATH   # an RPRMModule checkpoint (scripts/train_rprm.py); null: trained online
      scale: 0.1         # reward = sparse + scale * (score - offset)   (datamodules/rprm_shaping.py)
      offset: 0.0
      only_nonterminal: false
      sparse_from_success: false
      batch_size: 256    # RPRM scoring batch

The datamodule applies it to each rollout before the advantages (one batched, no-grad RPRM pass
over all frames). With ``checkpoint: null`` the shaping stays off until ``activate`` is called
with a checkpoint: callbacks/rprm.py ``OnlineRPRM`` trains the RPRM on pseudo-labels from the
run's own successful episodes, then activates it. Either way the checkpoint path is part of the
datamodule's state, so a resumed run shapes with the same RPRM.

Logged per iteration: ``rollout/reward_sparse`` (the unshaped reward), ``rollout/rprm_score`` (mean
RPRM score, while active), ``rollout/rprm_active``; ``rollout/reward_mean`` (CRLModule) is the
reward PPO trains on, ``rollout/success`` the success rate.
"""
from __future__ import annotations

import os

from datamodules.knobs import read_knobs
from datamodules.rprm_shaping import RPRMRewardShaping

KNOBS = {"rprm": None, "checkpoint": None, "scale": 0.1, "offset": 0.0, "only_nonterminal": False,
         "sparse_from_success": False, "batch_size": 256}
KEY = "data.reward_shaping"


def build_rprm(spec: dict, key: str = f"{KEY}.rprm"):
    """An RPRM from its ``{class_path, init_args}`` (typed and checked by jsonargparse, as the CLI does)."""
    from jsonargparse import ArgumentError, ArgumentParser

    from modules.vla_rl.rprm import RPRM

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--rprm", type=RPRM)
    try:
        cfg = parser.parse_object({"rprm": spec})
    except ArgumentError as err:  # jsonargparse's multi-line report -> one line naming the key
        raise ValueError(f"{key}: {' '.join(str(err).split())}") from None
    try:
        return parser.instantiate(cfg).rprm
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{key}: {err}") from None


def _check_checkpoint(path: str, key: str = f"{KEY}.checkpoint") -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}={path!r}: no such file (train one with scripts/train_rprm.py, or set it "
                                "to null and add callbacks.rprm.OnlineRPRM to train it on the run's own rollouts)")


class RewardShaping:
    def __init__(self, config: dict):
        cfg = {**KNOBS, **read_knobs(config, KNOBS, KEY)}
        if not isinstance(cfg["rprm"], dict) or "class_path" not in cfg["rprm"]:
            raise ValueError(f"{KEY}.rprm={cfg['rprm']!r}: expected the RPRM as {{class_path, init_args}}")
        kinds = {"scale": ((int, float), "a number"), "offset": ((int, float), "a number"),
                 "only_nonterminal": (bool, "true or false"), "sparse_from_success": (bool, "true or false"),
                 "batch_size": (int, "an integer"), "checkpoint": ((str, type(None)), "a path or null")}
        for name, (kind, what) in kinds.items():
            value = cfg[name]
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ValueError(f"{KEY}.{name}={value!r}: expected {what}")
        if cfg["batch_size"] < 1:
            raise ValueError(f"{KEY}.batch_size={cfg['batch_size']!r}: must be >= 1")
        if cfg["checkpoint"] is not None:
            _check_checkpoint(cfg["checkpoint"])  # before building a (possibly 7B) model
        self.options = {k: cfg[k] for k in ("scale", "offset", "only_nonterminal", "sparse_from_success",
                                             "batch_size")}
        self.rprm = build_rprm(cfg["rprm"])
        self.transform: RPRMRewardShaping | None = None
        self.checkpoint: str | None = None
        if cfg["checkpoint"] is not None:
            self.activate(cfg["checkpoint"])

    @property
    def active(self) -> bool:
        return self.transform is not None

    def activate(self, checkpoint: str) -> None:
        """Load the RPRM's weights from an RPRMModule checkpoint, freeze it, shape from now on."""
        from modules.vla_rl.rprm_module import load_rprm_weights

        _check_checkpoint(checkpoint)
        load_rprm_weights(self.rprm, checkpoint)
        self.transform = RPRMRewardShaping(self.rprm, **self.options)  # freezes the RPRM
        self.checkpoint = checkpoint

    def __call__(self, rollout, device) -> dict[str, float]:
        """Shape a [envs, T] rollout in place; returns the stats to log."""
        nxt = rollout.get("next")
        if not self.active:
            if self.options["sparse_from_success"]:  # the same sparse reward before and after activation
                nxt.set("reward", nxt.get("success").to(nxt.get("reward").dtype))
            return {"rollout/reward_sparse": float(nxt.get("reward").mean()), "rollout/rprm_active": 0.0}
        self.rprm.to(device)
        self.transform(rollout)
        return {"rollout/reward_sparse": float(nxt.get("reward_sparse").mean()),
                "rollout/rprm_score": float(nxt.get("rprm_score").mean()), "rollout/rprm_active": 1.0}

    def state_dict(self) -> dict:
        return {"checkpoint": self.checkpoint}

    def load_state_dict(self, state: dict) -> None:
        path = state.get("checkpoint")
        if path is not None and path != self.checkpoint:
            self.activate(path)
