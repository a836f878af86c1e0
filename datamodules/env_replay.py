"""The training env's history, replayed on resume so that a resumed run's env is where the
checkpointed run's env was, episodes in progress included (docs/reliability.md).

A rollout rarely ends every episode (LIBERO's last 300+ steps; ``configs/crl.yaml`` steps each env
256 times per iteration), so the env's state is part of what the next iteration depends on. It
lives in simulators (MuJoCo inside worker processes), which the kit does not pickle. Instead the
log keeps, since the current training env was built (one env per task), each rollout's actions
and the curriculum's initial-state queues it ran with; on resume the datamodule builds the env
from the same seed and ``replay`` steps it through those actions with the collector (the policy
is not run: ``RolloutPolicy.replay_actions``), which leaves it in the same state, as long as the
env is deterministic given its seed and actions (BabyAI, toy_vla, LIBERO on one machine and
build). The RNGs restored from the checkpoint are left alone meanwhile.
"""
from __future__ import annotations

import torch


class EnvReplayLog:
    def __init__(self):
        self.actions: list[torch.Tensor] = []  # rollout i's actions [envs, T, ...], on the CPU
        self.queues: list[list[list[int]]] = []  # with a curriculum: rollout i's queues, and the next one's

    def clear(self) -> None:
        """A new training env (a new task)."""
        self.actions, self.queues = [], []

    def record_build(self, curriculum) -> None:
        if curriculum is not None:
            self.queues = [curriculum.last_queues]

    def record_rollout(self, actions: torch.Tensor, curriculum) -> None:
        """After a rollout (and the curriculum's draw of the next rollout's queues)."""
        self.actions.append(actions.cpu())
        if curriculum is not None:
            self.queues.append(curriculum.last_queues)

    def replay(self, collector_iter, acting, curriculum) -> None:
        """Step a fresh env (in ``collector_iter``) through the recorded rollouts."""
        for i, actions in enumerate(self.actions):
            if curriculum is not None:
                curriculum.set_queues(self.queues[i])
            acting.replay_actions(actions)
            next(collector_iter)
        if curriculum is not None:
            curriculum.set_queues(self.queues[len(self.actions)])

    def __bool__(self) -> bool:
        return bool(self.actions)

    def state_dict(self) -> dict:
        return {"actions": list(self.actions), "queues": list(self.queues)}

    def load_state_dict(self, state: dict) -> None:
        self.actions, self.queues = list(state["actions"]), list(state["queues"])
