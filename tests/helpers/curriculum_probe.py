"""A test-only callback: writes the datamodule's VLA-RL state (curriculum, reward shaping) as JSON
when training starts, i.e. after a resume has restored it."""
import json
import os

from lightning import Callback


class StateProbe(Callback):
    def __init__(self, out: str):
        self.out = out

    def on_train_start(self, trainer, pl_module):
        dm = trainer.datamodule
        state = {"curriculum": None, "shaping_checkpoint": None, "shaping_active": None}
        if dm.curriculum is not None:
            cur = dm.curriculum.curriculum.state_dict()
            state["curriculum"] = {"keys": [list(k) for k in cur["keys"]], "history": cur["history"]}
        if dm.reward_shaping is not None:
            state["shaping_checkpoint"] = dm.reward_shaping.checkpoint
            state["shaping_active"] = dm.reward_shaping.active
        os.makedirs(os.path.dirname(self.out), exist_ok=True)
        with open(self.out, "w") as f:
            json.dump(state, f)
