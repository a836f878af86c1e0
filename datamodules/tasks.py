"""Task streams from YAML, and the env factory for each env kind.

A stream is a list of tasks, each a mapping::

    - {env: babyai, level: GoToObjectRoom, target: red ball}
    - {env: babyai, level: BabyAI-GoToObj-v0}
    - {env: babyai, level: GoToObjectRoom, target: red ball, num_init_states: 50}  # 50 fixed layouts
    - {env: babyai, level: GoToObjectRoom, target: purple key, objects: [red ball, purple key, blue box]}
    - {env: libero, suite: libero_goal, task_id: 3}            # one LIBERO task
    - {env: libero, suite: libero_goal, task_ids: [0, 1, 2]}   # expands to three tasks in order
    - {env: libero, suite: libero_goal, task_id: 3, chunked: true}  # [K, D] action chunks (OFT)
    - {env: toy_vla, instruction: move to the green target}    # continuous, CPU (datamodules/toy_vla.py)
    - stage:                                                   # a multi-task stage: trained jointly
        - {env: babyai, level: GoToObjectRoom, target: red ball}
        - {env: babyai, level: GoToObjectRoom, target: green key}

A ``stage`` entry trains its tasks together in one stage of the stream (env i pursues task
i mod K, as the MTL oracle does over the whole stream); its tasks must be the same level (or
LIBERO suite) and parameters, differing only in target (task id). Every method treats a
stage as one step of the stream: one row and one column of R (the success averaged over the
stage's tasks, episode e on task e mod K), one anchor head for all its goals.

``chunked`` (continuous-action kinds; default: true for toy_vla, false for libero): the env
executes a policy's [K, D] action chunk as one macro step (datamodules/chunking.py).

Bad entries fail with one line naming the key and the value.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Task:
    env: str
    level: str
    target: str | int | None = None  # BabyAI: the object; LIBERO: the task id in the suite
    max_steps: int | None = None
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    chunked: bool = False  # the env executes [K, D] action chunks as macro steps
    subtasks: tuple["Task", ...] = ()  # a multi-task stage: its tasks, trained jointly

    @property
    def name(self) -> str:
        if self.subtasks:
            return " + ".join(t.name for t in self.subtasks)
        return f"{self.level}:{self.target}" if self.target is not None else self.level

    @property
    def instructions(self) -> list[str | None]:
        """The goal text of every task of the stage (one task: its own)."""
        return [t.instruction for t in subtasks_of(self)]

    @property
    def instruction(self) -> str | None:
        """The goal text when the task fixes it (used to relabel states for anchors); None for
        a multi-task stage (``instructions``: one per task)."""
        if self.subtasks:
            return None
        if self.env == "babyai" and self.level == "GoToObjectRoom":
            return f"go to the {self.target}"
        if self.env == "libero":
            from datamodules.libero_setup import task_language

            return task_language(self.level, self.target)
        return self.params.get("instruction")


ENV_KINDS = ("babyai", "libero", "toy_vla")
BABYAI_OPTIONS = ("room_size", "objects", "num_init_states", "tile_size")  # BabyAIEnv's per-task arguments


class TaskStream:
    """Where a datamodule is in its stream (the interface TaskSwitch, PerTaskEvaluation and the
    progress bar read): ``tasks`` (the parsed stream) and ``task_index`` set by the subclass."""

    tasks: list[Task]
    task_index: int

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task(self) -> Task:
        return self.tasks[self.task_index]


def parse_stream(stream: list[dict], key: str = "data.stream") -> list[Task]:
    if not stream:
        raise ValueError(f"{key}={stream!r}: the task stream is empty")
    tasks = []
    for i, entry in enumerate(stream):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}={entry!r}: expected a mapping with env and level")
        entry = dict(entry)
        if "stage" in entry:
            tasks.append(_parse_stage(where, entry))
            continue
        env = entry.pop("env", None)
        if env not in ENV_KINDS:
            raise ValueError(f"{where}.env={env!r}: unknown env kind (known: {', '.join(ENV_KINDS)})")
        chunked = entry.pop("chunked", env == "toy_vla")
        if not isinstance(chunked, bool) or (chunked and env == "babyai"):
            raise ValueError(f"{where}.chunked={chunked!r}: true or false, and only for continuous-action "
                             "env kinds (libero, toy_vla)")
        if env == "libero":
            tasks += [replace(t, chunked=chunked) for t in _parse_libero(where, entry)]
            continue
        if env == "toy_vla":
            from datamodules.toy_vla import parse_toy_vla

            max_steps, params = parse_toy_vla(where, entry)
            tasks.append(Task(env, "ToyVLA", params["instruction"], max_steps, params, chunked))
            continue
        level = entry.pop("level", None)
        target = entry.pop("target", None)
        max_steps = entry.pop("max_steps", None)
        if max_steps is not None and int(max_steps) <= 0:
            raise ValueError(f"{where}.max_steps={max_steps!r}: must be > 0")
        unknown = sorted(set(entry) - set(BABYAI_OPTIONS))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}={entry[unknown[0]]!r}: unknown babyai option (known: level, "
                             f"target, max_steps, {', '.join(BABYAI_OPTIONS)})")
        _check_babyai(where, level, target, entry.get("room_size"), entry.get("objects"))
        tile = entry.get("tile_size", 8)
        if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
            raise ValueError(f"{where}.tile_size={tile!r}: must be a positive integer (pixels per cell)")
        n_init = entry.get("num_init_states")
        if n_init is not None and (not isinstance(n_init, int) or isinstance(n_init, bool) or n_init < 1):
            raise ValueError(f"{where}.num_init_states={n_init!r}: must be a positive integer")
        tasks.append(Task(env, level, target, max_steps, entry))
    return tasks


def _parse_stage(where: str, entry: dict) -> Task:
    """``{stage: [entry, ...]}`` -> one Task whose ``subtasks`` are trained jointly."""
    subs, extra = entry.pop("stage"), sorted(entry)
    if extra:
        raise ValueError(f"{where}.{extra[0]}={entry[extra[0]]!r}: a stage entry takes only 'stage'")
    if not isinstance(subs, list) or not subs or any(isinstance(e, dict) and "stage" in e for e in subs):
        raise ValueError(f"{where}.stage={subs!r}: expected a non-empty list of task entries (no nested stages)")
    tasks = parse_stream(subs, f"{where}.stage")
    try:
        check_joint(tasks, len(tasks))
    except ValueError:
        raise ValueError(f"{where}.stage={[t.name for t in tasks]!r}: a stage's tasks must be the same babyai "
                         "level (or LIBERO suite) and parameters, differing only in target (task_id)") from None
    first = tasks[0]
    return Task(first.env, first.level, None, first.max_steps, first.params, first.chunked, tuple(tasks))


def subtasks_of(task: Task) -> tuple[Task, ...]:
    """The tasks a stream entry trains: a stage's subtasks, or the task itself."""
    return task.subtasks or (task,)


def _parse_libero(where: str, entry: dict) -> list[Task]:
    from datamodules.libero import libero_options
    from datamodules.libero_setup import check_libero_task

    suite = entry.pop("suite", None)
    if "task_ids" in entry:
        ids = entry.pop("task_ids")
        if not isinstance(ids, list) or not ids:
            raise ValueError(f"{where}.task_ids={ids!r}: expected a non-empty list of task ids")
    else:
        ids = [entry.pop("task_id", None)]
    max_steps = entry.pop("max_steps", None)
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps <= 0):
        raise ValueError(f"{where}.max_steps={max_steps!r}: must be a positive integer")
    libero_options(entry, where)  # unknown options fail here
    for task_id in ids:
        check_libero_task(where, suite, task_id)
    return [Task("libero", suite, task_id, max_steps, dict(entry)) for task_id in ids]


def _check_babyai(where: str, level, target, room_size=None, objects=None) -> None:
    from datamodules.babyai import DEFAULT_ROOM_SIZE, GOTO_OBJECTS, check_objects

    if level == "GoToObjectRoom":
        check_objects(GOTO_OBJECTS if objects is None else objects, target,
                      DEFAULT_ROOM_SIZE if room_size is None else room_size, where=f"{where}.")
        return
    import gymnasium as gym
    import minigrid  # noqa: F401

    if not isinstance(level, str) or level not in gym.registry:
        raise ValueError(f"{where}.level={level!r}: unknown level (GoToObjectRoom or a "
                         "registered BabyAI/minigrid id such as BabyAI-GoToObj-v0)")


LIBERO_INIT_STATES = 50  # every task of the five standard suites ships 50 initial states


def init_state_count(task: Task, where: str = "data.stream[i]") -> int:
    """How many fixed initial states ``task`` has (the curriculum's keys per task)."""
    if task.env == "libero":
        return LIBERO_INIT_STATES
    n = task.params.get("num_init_states")
    if n is None:
        raise ValueError(f"{where}.num_init_states=None: data.curriculum needs a finite set of initial "
                         "states; set num_init_states (e.g. 50) in the babyai stream entry")
    return n


def make_env(task: Task, num_envs: int, seed: int | list[int], init_state_ids: list[int] | None = None,
             init_state_queues=None):
    """A batched TorchRL env for ``task`` (the VLA TensorDict schema). ``init_state_ids``
    (evaluation): env i starts from that fixed initial state where the env kind has them
    (LIBERO; BabyAI with ``num_init_states``); otherwise BabyAI's layouts come from the seed.
    ``init_state_queues`` (datamodules/init_states.py): the curriculum's ids for the resets.
    A multi-task stage: one env over its tasks (``make_joint_env``). ``seed``: a list gives
    LIBERO's workers one seed each (other env kinds take an int)."""
    if task.subtasks:
        return make_joint_env(list(task.subtasks), num_envs, seed, init_state_queues, init_state_ids)
    if task.env == "libero":
        from datamodules.libero import make_libero_env

        env = make_libero_env(task.level, task.target, num_envs, seed, task.max_steps, init_state_ids,
                              task.params, init_state_queues)
        if task.chunked:
            from datamodules.chunking import ChunkedActionEnv

            env = ChunkedActionEnv(env)
        return env
    if task.env == "toy_vla":
        from datamodules.toy_vla import make_toy_vla_env

        return make_toy_vla_env(num_envs, seed, task.max_steps, task.params, task.chunked)
    if task.env == "babyai":
        from datamodules.babyai import BabyAIEnv

        return BabyAIEnv(level=task.level, target=task.target, num_envs=num_envs, seed=seed,
                         max_steps=task.max_steps, init_state_ids=init_state_ids,
                         init_state_queues=init_state_queues, **task.params)
    raise ValueError(f"env={task.env!r}: unknown env kind")


def check_joint(tasks: list[Task], num_envs: int, who: str = "data.joint=True",
                num_envs_key: str = "data.num_envs") -> None:
    """Whether ``tasks`` can be joined into one batched env of ``num_envs`` envs (``who`` and
    ``num_envs_key`` name the setting in the error lines)."""
    first = tasks[0]
    if any((t.env, t.level, t.max_steps, t.params) != (first.env, first.level, first.max_steps, first.params)
           for t in tasks):
        raise ValueError(f"{who}: every task of data.stream must be the same babyai level (or LIBERO "
                         "suite) and parameters, differing only in target (task_id)")
    if num_envs < len(tasks):
        raise ValueError(f"{num_envs_key}={num_envs!r}: {who} needs >= {len(tasks)} (one per task)")


def make_joint_env(tasks: list[Task], num_envs: int, seed: int | list[int], init_state_queues=None,
                   init_state_ids: list[int] | None = None):
    """One batched env over all ``tasks`` at once (env i: task i mod K), for joint multi-task
    training (the MTL oracle, multi-task stages; VLA-RL's one policy for a whole LIBERO suite).
    The tasks must differ only in their target. ``init_state_ids`` (evaluation): env i runs
    episode ``init_state_ids[i]``, on task id mod K from its fixed initial state id."""
    if init_state_ids is None:
        check_joint(tasks, num_envs)
        order = [tasks[i % len(tasks)] for i in range(num_envs)]
    else:
        check_joint(tasks, len(tasks))
        order = [tasks[e % len(tasks)] for e in init_state_ids]
    first, targets = tasks[0], [t.target for t in order]
    if first.env == "libero":  # worker i runs targets[i]
        from datamodules.libero import make_libero_env

        return make_libero_env(first.level, targets, num_envs, seed, first.max_steps,
                               init_state_ids, first.params, init_state_queues)
    from datamodules.babyai import BabyAIEnv

    return BabyAIEnv(level=first.level, target=targets, num_envs=num_envs, seed=seed, max_steps=first.max_steps,
                     init_state_queues=init_state_queues, init_state_ids=init_state_ids, **first.params)


def instructions_of(td, key="language_instruction") -> list[str]:
    """Flat list of the instruction strings of a (possibly batched) tensordict."""
    value = td.get(key)
    n = td.batch_size.numel()
    data = getattr(value, "data", None)
    if isinstance(data, str):
        return [data] * n
    flat = value.tolist()
    while flat and isinstance(flat[0], list):
        flat = [s for row in flat for s in row]
    return flat
