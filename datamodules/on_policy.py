"""The replay-free on-policy datamodule.

Each Lightning epoch is one PPO iteration: a ``torchrl.collectors.Collector`` runs the
current policy on the current task's vectorised envs for ``frames_per_batch`` frames, the
module turns the rollout into samples (values, GAE, MC returns, anchor targets; no grad),
this module yields ``ppo_epochs`` x shuffled minibatches, and the rollout is dropped.
No buffer feeds the policy gradient of the methods that keep no memory. The only stored data
is the optional bounded memory of old-task samples (``memory_per_task`` per stage from the
stage's last rollout, at most ``memory_size`` in all; on the CPU, checkpointed): the anchor
states of CRL with ``anchor_source: memory``, and the transitions ER replays
(callbacks/replay.py, ``model.replay_*``), a third kind of minibatch part next to ``cur``
and ``anchor``.

A checkpoint holds the datamodule's state, including the memory and the training env's replay
log (datamodules/env_replay.py): a resumed run's env continues the episodes it was in.

The datamodule knows the stream and the current stage (a stream entry: one task, or several
trained jointly); *when* the stage changes is decided by the TaskSwitch callback
(``set_task``), and old goals are registered by the continual method's callback
(``remember_task``), each with the anchor head that was trained on it.

VLA-RL's parts, both off by default: ``curriculum`` (datamodules/curriculum_resets.py) picks
the initial state of every training reset and learns from the finished episodes;
``reward_shaping`` (datamodules/reward_shaping.py) adds the RPRM's score to each rollout's reward
before the advantages. Callbacks that define ``on_rollout(trainer, pl_module, rollout)`` see
each raw rollout first (callbacks/rprm.py collects its successful episodes).
"""
from __future__ import annotations

import math

import torch
from lightning import LightningDataModule
from tensordict import TensorDict
from torch.utils.data import DataLoader, IterableDataset
from torchrl.collectors import Collector

from datamodules.curriculum_resets import Curriculum, CurriculumResets
from datamodules.env_replay import EnvReplayLog
from datamodules.reward_shaping import RewardShaping
from datamodules.robust_env import worker_restarts
from datamodules.tasks import (Task, TaskStream, check_joint, instructions_of, make_env, make_joint_env, parse_stream,
                              subtasks_of)
from modules.checkpoint_io import CheckpointError, rng_state, set_rng_state
from modules.timing import phase

ANCHOR_SOURCES = ("relabel", "memory")


class _RolloutMinibatches(IterableDataset):
    """Iterating it collects one rollout and yields its minibatches (one PPO iteration)."""

    def __init__(self, dm: "OnPolicyDataModule"):
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.ppo_epochs * self.dm.num_minibatches

    def __iter__(self):
        yield from self.dm.iteration()


class OnPolicyDataModule(TaskStream, LightningDataModule):
    def __init__(
        self,
        stream: list[dict],
        num_envs: int = 32,
        frames_per_batch: int = 2048,
        ppo_epochs: int = 4,
        num_minibatches: int = 4,
        anchor_source: str = "relabel",
        anchor_fraction: float = 0.5,
        memory_per_task: int = 512,
        memory_size: int | None = None,
        joint: bool = False,
        seed: int = 0,
        curriculum: Curriculum | None = None,
        reward_shaping: dict | None = None,
    ):
        """The task stream and its rollouts: one PPO iteration's minibatches per Lightning epoch.

        Args:
            stream: the stages in order, one mapping per entry: ``{env: babyai, level, target}``,
                ``{env: libero, suite, task_id | task_ids, ...}`` or ``{stage: [entry, ...]}`` (several
                tasks trained jointly; datamodules/tasks.py lists the options).
            num_envs: vectorised envs collecting each rollout (per DDP rank).
            frames_per_batch: env steps per rollout, over all envs (a multiple of ``num_envs``).
            ppo_epochs: passes over each rollout.
            num_minibatches: minibatches per pass.
            anchor_source: where anchor states come from: ``relabel`` (current states with old
                instructions) or ``memory`` (stored states of old tasks).
            anchor_fraction: anchor samples per current sample (``relabel``).
            memory_per_task: old-task samples kept per finished stage (``anchor_source: memory``, ER's replay).
            memory_size: the memory's bound in all (null: memory_per_task x stages); each stored stage
                then keeps an equal share (a random subset).
            joint: collect every task of the stream in every rollout (env i: task i mod K).
            seed: seed of the envs and of the anchor sampling.
            curriculum: VLA-RL's success curriculum over (task, initial state),
                ``{window, target, temperature, floor}``; null: uniform draws.
            reward_shaping: the RPRM's process reward, ``{rprm, checkpoint, scale, offset,
                only_nonterminal, sparse_from_success, batch_size}`` (datamodules/reward_shaping.py); null: none.
        """
        super().__init__()
        self.tasks: list[Task] = parse_stream(stream)
        if num_envs <= 0:
            raise ValueError(f"data.num_envs={num_envs!r}: must be > 0")
        if frames_per_batch <= 0:
            raise ValueError(f"data.frames_per_batch={frames_per_batch!r}: must be > 0")
        if frames_per_batch % num_envs:
            raise ValueError(f"data.frames_per_batch={frames_per_batch!r}: must be a multiple "
                             f"of data.num_envs={num_envs}")
        for name, value in (("ppo_epochs", ppo_epochs), ("num_minibatches", num_minibatches)):
            if value <= 0:
                raise ValueError(f"data.{name}={value!r}: must be > 0")
        if num_minibatches > frames_per_batch:
            raise ValueError(f"data.num_minibatches={num_minibatches!r}: more minibatches than samples per iteration "
                             f"(data.frames_per_batch={frames_per_batch})")
        if anchor_source not in ANCHOR_SOURCES:
            raise ValueError(f"data.anchor_source={anchor_source!r}: expected one of {ANCHOR_SOURCES}")
        if not 0.0 < anchor_fraction <= 1.0:
            raise ValueError(f"data.anchor_fraction={anchor_fraction!r}: must be in (0, 1]")
        if memory_per_task < 0:
            raise ValueError(f"data.memory_per_task={memory_per_task!r}: must be >= 0")
        if memory_size is not None and memory_size <= 0:
            raise ValueError(f"data.memory_size={memory_size!r}: must be > 0 or null")
        if curriculum is not None and any(t.subtasks for t in self.tasks):
            raise ValueError("data.curriculum: not supported with multi-task stages (stage entries) in data.stream")
        spares = next((t.params["spare_envs"] for t in self.tasks if t.params.get("spare_envs")), 0)
        if curriculum is not None and spares:
            raise ValueError(f"data.stream[i].spare_envs={spares!r}: not with data.curriculum (a spare worker "
                             "draws its initial state before the curriculum writes the next rollout's); set it to 0")
        self.save_hyperparameters()
        self.num_envs, self.frames_per_batch = num_envs, frames_per_batch
        self.ppo_epochs, self.num_minibatches = ppo_epochs, num_minibatches
        self.anchor_source, self.anchor_fraction = anchor_source, anchor_fraction
        self.memory_per_task, self.memory_size, self.seed = memory_per_task, memory_size, seed
        # joint=True (the MTL oracle): every iteration collects all tasks of the stream at
        # once; TaskSwitch still cuts training into blocks, so R has one row per block
        self.joint = joint
        if joint:
            check_joint(self.all_tasks, num_envs)  # fail now on a stream it cannot join
        self.task_index = 0
        self.anchor_goals: list[str] = []  # instructions of earlier tasks (old goals)
        self.anchor_heads: list[int] = []  # the anchor head of each old goal (-1: none yet, the newest)
        self.memory: TensorDict | None = None  # old-task samples (anchor_source memory, ER)
        self._last_samples: TensorDict | None = None
        self._last_instructions: list[str] = []  # the instruction of each of the last samples
        self._collector = None
        self._collector_key = None
        self.env_version = 0  # +1 per training env built (episodes do not continue across envs)
        self.env_log = EnvReplayLog()  # what the training env went through: replayed on resume (exactly)
        self._replay = False  # a resumed run: the next env built replays env_log
        self._restarts_closed = {"step": 0, "start": 0}  # env workers restarted in the closed envs
        # VLA-RL: the curriculum over (task, initial state) and the RPRM's reward shaping
        self.curriculum = None if curriculum is None else CurriculumResets(curriculum, self.tasks, seed)
        self.reward_shaping = None if reward_shaping is None else RewardShaping(dict(reward_shaping))

    # -- the stream ----------------------------------------------------------------------
    @property
    def all_tasks(self) -> list[Task]:
        """Every task of the stream, stages flattened (the MTL oracle trains them all at once)."""
        return [t for stage in self.tasks for t in subtasks_of(stage)]

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self._trainer_ok() else 0

    def _trainer_ok(self) -> bool:
        return getattr(self, "trainer", None) is not None

    def set_task(self, index: int) -> None:
        self.task_index = index
        self._close_collector()
        self.env_log.clear()
        self._replay = False  # a new task's env is built afresh, in a resumed run as in an uninterrupted one

    def remember_task(self, index: int, head: int | None = None, keep_states: bool = False) -> None:
        """Register stage ``index``'s goals as old goals, trained by anchor head ``head``
        (None: no head, e.g. ER alone), and store some of its samples when a memory is used
        (``anchor_source: memory``, or ``keep_states``: ER). Stored samples keep their own
        instruction, so a stage without a fixed instruction works with a memory."""
        store = (self.anchor_source == "memory" or keep_states) and self.memory_per_task > 0
        stored = self.memory is not None and bool((self.memory.get("task") == index).any())
        if store and not stored and self._last_samples is not None:
            self._store(index, head)
        for goal in self.tasks[index].instructions:
            if goal is None and self.anchor_source == "relabel":
                raise ValueError(f"data.stream[{index}]: task {self.tasks[index].name} has no fixed "
                                 "instruction to relabel with; use anchor_source: memory")
            if goal is not None:
                self._add_goal(goal, head)

    def _add_goal(self, goal: str, head: int | None) -> int:
        """Index of ``goal`` in anchor_goals (appended if new); a given head replaces its old one."""
        if goal not in self.anchor_goals:
            self.anchor_goals.append(goal)
            self.anchor_heads.append(-1)
        i = self.anchor_goals.index(goal)
        if head is not None:
            self.anchor_heads[i] = head
        return i

    def _store(self, index: int, head: int | None) -> None:
        """``memory_per_task`` random samples of the stage's last rollout, kept on the CPU with
        their goal, stage, action, behaviour log-prob and advantage; then the bound."""
        s = self._last_samples
        keep = torch.randperm(s.numel())[: self.memory_per_task]
        goals = [self._add_goal(self._last_instructions[i], head) for i in keep.tolist()]
        new = TensorDict({"image": s.get("image")[keep].cpu(), "goal": torch.tensor(goals, dtype=torch.long),
                          "task": torch.full((len(keep),), index, dtype=torch.long),
                          **{k: s.get(k)[keep].cpu() for k in ("tokens", "log_prob", "advantage")}},
                         batch_size=[len(keep)])
        self.memory = new if self.memory is None else torch.cat([self.memory, new])
        if self.memory_size is not None and self.memory.numel() > self.memory_size:
            stages = self.memory.get("task").unique().tolist()  # an equal share per stored stage
            share = self.memory_size // len(stages)
            rows = [(self.memory.get("task") == t).nonzero().squeeze(-1) for t in stages]
            self.memory = self.memory[torch.cat([r[torch.randperm(len(r))[:share]] for r in rows]).sort().values]

    @property
    def last_samples(self) -> TensorDict | None:
        """The last iteration's current-task samples (for callbacks at a task end)."""
        return self._last_samples

    def make_env(self, task: Task, num_envs: int, seed: int, init_state_ids: list[int] | None = None,
                 init_state_queues=None):
        return make_env(task, num_envs, seed, init_state_ids, init_state_queues)

    def env_tasks(self) -> list[int]:
        """The stream index of the task each training env pursues (curriculum; no stages)."""
        if self.joint:
            return [i % self.num_tasks for i in range(self.num_envs)]
        return [self.task_index] * self.num_envs

    # -- collection ----------------------------------------------------------------------
    def _collector_for(self, module):
        key = (self.task_index,)
        if self._collector is None or self._collector_key != key:
            with phase("env_start"):
                self._new_collector(module, key)
        return self._collector_iter

    def _new_collector(self, module, key) -> None:
        self._close_collector()
        # a resumed run rebuilds its env where the checkpoint left it (datamodules/env_replay.py),
        # without moving the RNGs the checkpoint restored (building draws: the collector's probe)
        replay, self._replay = self._replay, False
        rng = rng_state() if replay else None
        # each rank its own envs and seeds; a new seed block per task
        seed = self.seed + 100_003 * self.rank + 1_009 * self.task_index
        queues = None
        if self.curriculum is not None:  # at most frames_per_env + 1 resets per env and rollout
            queues = self.curriculum.new_env(self.env_tasks(), self.frames_per_batch // self.num_envs + 1,
                                             draw=not replay)
        env = (make_joint_env(self.all_tasks, self.num_envs, seed, queues) if self.joint
               else self.make_env(self.task, self.num_envs, seed, None, queues))
        self.env_version += 1
        # envs step on their own device (CPU for BabyAI/LIBERO), the policy on the module's
        acting = module.acting_policy()
        self._collector = Collector(env, acting, frames_per_batch=self.frames_per_batch,
                                    total_frames=-1, env_device=env.device,
                                    policy_device=module.device, storing_device=module.device,
                                    # the policy is stateless (no InitTracker/recurrent state)
                                    auto_register_policy_transforms=False)
        self._collector_iter = iter(self._collector)
        self._collector_key = key
        if replay:
            self.env_log.replay(self._collector_iter, acting, self.curriculum)
            set_rng_state(rng)
        else:
            self.env_log.record_build(self.curriculum)

    def _close_collector(self) -> None:
        if self._collector is not None:
            self._restarts_closed = self.worker_restarts()
            self._collector.shutdown()
        self._collector = None

    def worker_restarts(self) -> dict[str, int]:
        """Training env workers restarted in the run so far (datamodules/robust_env.py): ``step``
        (mid-episode; the episode counted as failed) and ``start`` (while starting)."""
        now = worker_restarts(self._collector.env) if self._collector is not None else {"step": 0, "start": 0}
        return {k: self._restarts_closed[k] + now[k] for k in now}

    def iteration(self):
        module = self.trainer.lightning_module
        module.eval()  # acting and the no-grad targets below run in eval mode (one decode graph)
        with phase("collection"):
            rollout = next(self._collector_for(module)).to(module.device)
        extra = {}
        if self.curriculum is not None:
            extra.update(self.curriculum.update(rollout, self.trainer))
            self.curriculum.refill()  # the next rollout's initial states, from the updated curriculum
        self.env_log.record_rollout(rollout.get("action"), self.curriculum)
        for cb in self.trainer.callbacks:  # raw rollouts for callbacks (callbacks/rprm.py)
            if hasattr(cb, "on_rollout"):
                cb.on_rollout(self.trainer, module, rollout)
        if self.reward_shaping is not None:
            with phase("reward_shaping"):
                extra.update(self.reward_shaping(rollout, module.device))
        samples, anchors, stats = module.process_rollout(
            rollout, self.anchor_goals, self.anchor_fraction,
            self.memory if self.anchor_source == "memory" else None, self.anchor_heads)
        replay = None
        if module.replays and self.memory is not None and self.memory.numel():  # ER
            replay = module.replay_samples(self.memory, self.anchor_goals)
        module.train()
        restarts = self.worker_restarts()
        extra.update({"env/worker_restarts": float(restarts["step"]),
                      "env/worker_start_restarts": float(restarts["start"])})
        module.rollout_stats = {**stats, **extra}
        self._last_samples = samples
        self._last_instructions = instructions_of(rollout.reshape(-1))  # the samples' order
        del rollout
        n = samples.numel()
        mb = math.ceil(n / self.num_minibatches)
        parts = {k: v for k, v in (("anchor", anchors), ("replay", replay)) if v is not None and v.numel()}
        for _ in range(self.ppo_epochs):
            perm = torch.randperm(n, device=samples.device)
            perms = {k: torch.randperm(v.numel(), device=samples.device) for k, v in parts.items()}
            for k in range(self.num_minibatches):
                idx = perm[k * mb:(k + 1) * mb]
                if not len(idx):  # ceil-sized minibatches leave the last ones empty when k does not divide n
                    continue
                batch = {"cur": samples[idx]}
                for key, v in parts.items():  # each part split over the same number of minibatches
                    size = math.ceil(v.numel() / self.num_minibatches)
                    rows = perms[key][k * size:(k + 1) * size]
                    if len(rows):
                        batch[key] = v[rows]
                yield batch

    def setup(self, stage: str | None = None) -> None:
        backbone = getattr(self.trainer.lightning_module.policy, "backbone", None) if self._trainer_ok() else None
        for i, task in enumerate(self.tasks):  # a word the tokenizer does not know would become its <unk>
            for text in task.instructions:
                unknown = [] if text is None or backbone is None else backbone.unknown_words(text)
                if unknown:
                    raise ValueError(f"data.stream[{i}]={task.name!r}: the instruction {text!r} has words outside "
                                     f"the policy's vocabulary: {unknown} (model.policy.init_args.backbone)")
        shaping = self.reward_shaping
        if (shaping is not None and not shaping.active and self._trainer_ok()
                and not any(getattr(cb, "trains_rprm", False) for cb in self.trainer.callbacks)):
            raise ValueError("data.reward_shaping.checkpoint=None: nothing would train the RPRM; give an "
                             "RPRMModule checkpoint (scripts/train_rprm.py) or add callbacks.rprm.OnlineRPRM")

    def train_dataloader(self):
        return DataLoader(_RolloutMinibatches(self), batch_size=None, num_workers=0,
                          collate_fn=_identity)

    def test_dataloader(self):
        """One empty step: ``train.py test`` scores the stream's tasks in the evaluation
        callbacks (callbacks/evaluation.py), not from batches."""
        return DataLoader([0], batch_size=None, num_workers=0)

    def teardown(self, stage: str) -> None:
        self._close_collector()

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stream": [t.name for t in self.tasks], "task_index": self.task_index,
                "anchor_goals": list(self.anchor_goals), "anchor_heads": list(self.anchor_heads),
                "memory": None if self.memory is None else self.memory.to_dict(),
                "curriculum": None if self.curriculum is None else self.curriculum.state_dict(),
                "reward_shaping": None if self.reward_shaping is None else self.reward_shaping.state_dict(),
                "env_log": self.env_log.state_dict(), "worker_restarts": self.worker_restarts()}

    def load_state_dict(self, state: dict) -> None:
        names = [t.name for t in self.tasks]
        fitting = not self._trainer_ok() or self.trainer.state.fn == "fit"  # train.py test may score other tasks
        if fitting and state.get("stream", names) != names:  # R's rows and the anchors' goals belong to the stream
            raise CheckpointError(f"data.stream={names}: the checkpoint (--ckpt_path) was trained on the stream "
                                  f"{state['stream']}; resume with the same data.stream")
        self.set_task(state["task_index"])
        self.anchor_goals = list(state["anchor_goals"])
        self.anchor_heads = list(state.get("anchor_heads", [-1] * len(self.anchor_goals)))
        mem = state.get("memory")
        self.memory = None if mem is None else TensorDict(mem, batch_size=[len(mem["goal"])])
        if self.curriculum is not None and state.get("curriculum") is not None:
            self.curriculum.load_state_dict(state["curriculum"])
        if self.reward_shaping is not None and state.get("reward_shaping") is not None:
            self.reward_shaping.load_state_dict(state["reward_shaping"])
        self._restarts_closed = dict(state.get("worker_restarts", self._restarts_closed))
        # older checkpoints: the env starts afresh; under DDP the checkpoint holds rank 0's log,
        # so the other ranks' envs start afresh too (exact resume is for single-process runs)
        if fitting and state.get("env_log") is not None and self.rank == 0:
            self.env_log.load_state_dict(state["env_log"])
            self._replay = bool(self.env_log)


def _identity(batch):
    return batch  # minibatches are already TensorDicts
