"""Which fixed initial state an env's next reset uses.

Envs with a finite set of initial states (LIBERO's 50 per task; BabyAI with ``num_init_states``)
report the id each episode started from as the observation key ``init_state_id``. The id of a
reset of env i is, in this order:

1. the next id of env i's queue in ``InitStateQueues`` (the curriculum's draw: the datamodule
   writes one queue per env before each rollout, long enough for all of its resets);
2. the pinned id (evaluation: env i always starts from state ``init_state_ids[i]``);
3. a uniform draw (training without a curriculum).

The queues live in one shared-memory tensor that each env gets when it is built (in-process
for BabyAI; for LIBERO through the worker's picklable maker), so the ids need no channel of
their own: resets made anywhere (the collector's auto-resets, a restarted worker) pop them.
Between rollouts the workers are idle, so the datamodule's writes never race their reads.
"""
from __future__ import annotations

import torch

KEY = "init_state_id"  # the observation key: the id the current episode started from


class InitStateQueues:
    """Per-env FIFO queues of ids in a shared tensor [envs, 2 + capacity]: length, read pointer, ids.

    ``scene_seeds`` (evaluation): env i's episode from state e is laid out from seed
    ``scene_seeds[i] + e`` (LIBERO: the fixtures' placement), so an evaluation episode's scene
    depends on its task and initial state only, not on which worker plays it or after what."""

    def __init__(self, num_envs: int, capacity: int):
        self.capacity = int(capacity)
        self.data = torch.zeros(num_envs, 2 + self.capacity, dtype=torch.int64).share_memory_()
        self.scene_seeds = torch.full((num_envs,), -1, dtype=torch.int64).share_memory_()

    def set(self, queues: list[list[int]], scene_seeds: list[int] | None = None) -> None:
        if len(queues) != len(self.data):
            raise ValueError(f"{len(queues)} queues for {len(self.data)} envs")
        self.data.zero_()
        self.scene_seeds.fill_(-1)
        if scene_seeds is not None:
            self.scene_seeds.copy_(torch.as_tensor(scene_seeds, dtype=torch.int64))
        for i, q in enumerate(queues):
            if len(q) > self.capacity:
                raise ValueError(f"init-state queue of {len(q)} ids > capacity {self.capacity}")
            self.data[i, 0] = len(q)
            self.data[i, 2:2 + len(q)] = torch.as_tensor(list(q), dtype=torch.int64)

    def push(self, env_index: int, state_id: int) -> None:
        """Append ``state_id`` to env ``env_index``'s queue (while its worker is idle)."""
        row = self.data[env_index]
        length = int(row[0])
        if length >= self.capacity:
            raise ValueError(f"init-state queue of env {env_index} is full (capacity {self.capacity})")
        row[2 + length] = int(state_id)
        row[0] = length + 1

    def scene_seed(self, env_index: int) -> int | None:
        seed = int(self.scene_seeds[env_index])
        return None if seed < 0 else seed

    def pop(self, env_index: int) -> int | None:
        row = self.data[env_index]
        length, read = int(row[0]), int(row[1])
        if read >= length:
            return None
        row[1] = read + 1
        return int(row[2 + read])

    def remaining(self, env_index: int) -> list[int]:
        row = self.data[env_index]
        return row[2 + int(row[1]):2 + int(row[0])].tolist()


class InitStateChooser:
    """The id of one env's next reset (queue, else pinned, else uniform)."""

    def __init__(self, count: int, pinned: int | None = None, generator: torch.Generator | None = None,
                 queues: InitStateQueues | None = None, env_index: int = 0):
        if count < 1:
            raise ValueError(f"num_init_states={count!r}: must be >= 1")
        self.count = int(count)
        self.pinned = None if pinned is None else int(pinned) % self.count  # ids beyond the set wrap around
        self.generator = generator if generator is not None else torch.Generator()
        self.queues, self.env_index = queues, env_index

    def scene_seed(self) -> int | None:
        """The seed of the next episode's scene (``InitStateQueues.scene_seeds``; None: the env's own RNG)."""
        return None if self.queues is None else self.queues.scene_seed(self.env_index)

    def next(self) -> int:
        queued = None if self.queues is None else self.queues.pop(self.env_index)
        if queued is not None:
            if not 0 <= queued < self.count:
                raise ValueError(f"init-state id {queued} out of range: this env has {self.count} initial states")
            return queued
        if self.pinned is not None:
            return self.pinned
        return int(torch.randint(self.count, (), generator=self.generator))  # as torchrl's "random" mode
