"""``data.curriculum``: VLA-RL's success curriculum (datamodules/curriculum.py) driving the
training resets.

Keys are (task index in data.stream, initial-state id). Env i of the training env pursues a
fixed task (the current one; with ``data.joint`` task i mod K: a LIBERO worker holds one task's
scene), so the curriculum picks *which initial state* each reset uses, among the states of
that env's task. Before each rollout every env gets a queue of ids drawn from the curriculum
(datamodules/init_states.py: enough for every reset of the rollout); after it, each finished
episode's outcome is recorded under (its env's task, the ``init_state_id`` the env reported),
gathered over DDP ranks so every rank keeps the same curriculum. Its state (histories and the
sampling generator) is part of the datamodule's ``state_dict``, so it survives a resume.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass

import torch

from datamodules.curriculum import SuccessCurriculum
from datamodules.init_states import KEY, InitStateQueues
from datamodules.knobs import read_knobs
from datamodules.tasks import Task, init_state_count

KNOBS = ("window", "target", "temperature", "floor")


@dataclass
class Curriculum:
    """``data.curriculum``: which initial state each training reset uses (datamodules/curriculum.py).

    Args:
        window: last outcomes of a (task, initial state) averaged into its success p_k.
        target: the success the sampling prefers (VLA-RL: 0.5).
        temperature: width of the preference, P(k) ~ max(floor, exp(-|p_k - target| / temperature)).
        floor: the least weight of a (task, initial state): every one is revisited.
    """

    window: int = 20
    target: float = 0.5
    temperature: float = 0.2
    floor: float = 0.05


class CurriculumResets:
    def __init__(self, config: Curriculum | dict, tasks: list[Task], seed: int = 0):
        config = asdict(config) if is_dataclass(config) else read_knobs(config, KNOBS, "data.curriculum")
        try:
            self.curriculum = SuccessCurriculum(**config)
        except ValueError as err:
            raise ValueError(f"data.{err}") from None
        for i, task in enumerate(tasks):
            init_state_count(task, f"data.stream[{i}]")  # every task needs a finite set of states
        self.tasks = tasks
        self.generator = torch.Generator().manual_seed(seed)
        self.queues: InitStateQueues | None = None
        self.env_tasks: list[int] = []
        self.last_queues: list[list[int]] = []  # the ids drawn for the current rollout (tests, logs)

    def new_env(self, env_tasks: list[int], resets_per_rollout: int, draw: bool = True) -> InitStateQueues:
        """The datamodule builds a training env whose env i pursues task ``env_tasks[i]``:
        register those tasks' keys and return the queues (filled, unless ``draw`` is false: a
        resumed run sets them from its checkpoint) to build the env with."""
        self.env_tasks = list(env_tasks)
        for t in sorted(set(env_tasks)):
            self.curriculum.add_keys((t, s) for s in range(init_state_count(self.tasks[t])))
        self.queues = InitStateQueues(len(env_tasks), resets_per_rollout)
        if draw:
            self.refill()
        return self.queues

    def set_queues(self, queues: list[list[int]]) -> None:
        """Queues drawn earlier (a resumed run replaying its env), without a draw."""
        self.queues.set(queues)
        self.last_queues = queues

    def refill(self) -> None:
        """Draw every env's ids for the next rollout (among its task's initial states)."""
        cap = self.queues.capacity
        queues: list[list[int]] = [[] for _ in self.env_tasks]
        for t in sorted(set(self.env_tasks)):
            envs = [i for i, u in enumerate(self.env_tasks) if u == t]
            keys = [k for k in self.curriculum.keys if k[0] == t]
            drawn = self.curriculum.sample(len(envs) * cap, self.generator, among=keys)
            for j, i in enumerate(envs):
                queues[i] = [s for _, s in drawn[j * cap:(j + 1) * cap]]
        self.queues.set(queues)
        self.last_queues = queues

    def update(self, rollout, trainer=None) -> dict[str, float]:
        """Record the finished episodes of a [envs, T] rollout; returns the stats to log."""
        n, T = rollout.batch_size
        done = rollout.get(("next", "done")).reshape(n, T)
        env, step = done.nonzero(as_tuple=True)
        tasks = torch.as_tensor(self.env_tasks, device=done.device)[env]
        ids = rollout.get(("next", KEY)).reshape(n, T)[env, step]
        success = rollout.get(("next", "success")).reshape(n, T)[env, step].long()
        outcomes = _gather(torch.stack([tasks, ids, success], -1), trainer)
        self.curriculum.update([(t, s) for t, s, _ in outcomes.tolist()], outcomes[:, 2].cpu())
        among = [k for k in self.curriculum.keys if k[0] in set(self.env_tasks)]
        w = self.curriculum.weights(among)
        return {"curriculum/episodes": float(len(outcomes)),
                "curriculum/success_mean": float(self.curriculum.success_rates(among).mean()),
                "curriculum/effective_keys": float(1.0 / (w ** 2).sum()),
                "curriculum/keys": float(len(among))}

    def state_dict(self) -> dict:
        return {"curriculum": self.curriculum.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.curriculum.load_state_dict(state["curriculum"])
        self.generator.set_state(state["generator"])


def _gather(outcomes: torch.Tensor, trainer) -> torch.Tensor:
    """[E, 3] rows of every DDP rank (E differs per rank: padded with -1, then dropped)."""
    if trainer is None or trainer.world_size == 1:
        return outcomes
    sizes = trainer.strategy.all_gather(torch.tensor([len(outcomes)], device=outcomes.device))
    padded = outcomes.new_full((int(sizes.max()), 3), -1)
    padded[:len(outcomes)] = outcomes
    rows = trainer.strategy.all_gather(padded).reshape(-1, 3)
    return rows[rows[:, 0] >= 0]
