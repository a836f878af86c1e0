"""A batched env of one-process-per-env workers that survives crashed and hung workers.

torchrl's ``ParallelEnv`` stops (or waits up to ``BATCHED_PIPE_TIMEOUT``, 10,000 s) when a
worker dies; a MuJoCo instability or an EGL error in one of 16 LIBERO workers would end the
run. Here every call to a worker has a deadline. A worker that dies or misses it is killed
and restarted in the background; its current episode ends as a failure: the step returns
its last good observation with reward 0, ``done`` and ``truncated`` true (so GAE bootstraps
from a real observation: no NaN reaches the loss), ``success`` false and ``env_failed``
true; the next reset waits for the fresh worker. ``failures`` counts them for logging.
Start-up is guarded the same way: a worker that dies while it builds its env, or has not
answered after ``start_timeout`` seconds (a hung EGL context, a stuck import), is killed and
started again, up to ``start_retries`` times in a row (then one error line); ``start_restarts``
counts them. The training datamodule and the evaluation report both counts (TensorBoard
``env/worker_restarts``; ``env_worker_restarts`` in metrics.json).

Workers hold one unbatched torchrl env each (built by a picklable ``make_env()``) and answer
``reset`` and ``step`` over a pipe.

Spare workers (``spare_makers``): in a lock-step pool every worker waits while one resets (a
LIBERO episode start is ~10-30 env steps' worth of time), so with N workers each episode end
stalls all N. A spare is a worker whose reset was asked for in advance and runs while the pool
steps: when slot i's episode ends, a spare of the same ``group`` (e.g. the same task) whose
reset is done takes slot i's place, and slot i's old worker starts its own reset in the
background and becomes a spare. With no spare ready the slot resets its own worker as before.
Spares draw their initial state when their reset starts (training draws, not pinned ids or a
curriculum's queues, which are written between rollouts).

Partial steps (torchrl's ``"_step"`` mask in the input TensorDict): only the workers whose
entry is true step; the others do no work and their row repeats their last observation and
the done flags (and ``success``) of their last step, with reward 0. The evaluation uses it to
stop simulating and rendering envs whose episode has ended.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
from multiprocessing.connection import wait

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict, TensorDictBase
from torchrl.data import Categorical, Composite
from torchrl.envs import EnvBase

from modules.timing import phase

FAILED_KEY = "env_failed"


def _send(conn, obj) -> None:
    """Pickled by value. ``Connection.send`` goes through torch's ForkingPickler, which moves
    every tensor into a shared-memory segment of its own and passes its fd over a socket, a cost
    per tensor per step (bench/env_pool_overhead.py, docs/benchmarks.md)."""
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn):
    return pickle.loads(conn.recv_bytes())


def _to_wire(td: TensorDictBase) -> dict:
    """A worker's transition as a flat {key tuple: numpy array or python object (strings)}:
    cheaper to pickle than the TensorDict itself."""
    return _flatten(td.numpy())


def _flatten(data: dict, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _batch(rows: list[dict]) -> TensorDictBase:
    """Workers' flat rows -> one TensorDict [n]: one ``np.stack`` per key, instead of a
    TensorDict per worker stacked with ``torch.stack``: in lock-step every worker waits while the
    main process assembles the batch."""
    td = TensorDict(batch_size=[len(rows)])
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], (np.ndarray, np.generic)):
            td.set(key, torch.from_numpy(np.stack(values)))
        elif all(v == values[0] for v in values):  # non-tensor leaves (instructions), one value for
            td.set(key, NonTensorData(values[0], batch_size=[len(rows)]))  # all (as BabyAIEnv's)
        else:  # per-env values: stacked as torch.stack of TensorDicts would
            td.set(key, NonTensorStack(*(NonTensorData(v) for v in values)))
    return td


def _worker(make_env, conn, environ: dict) -> None:
    # the parent's environment now, as a spawned worker would have it (a forkserver's child
    # otherwise has the server's, from when the server started)
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(1)
    env = make_env()
    _send(conn, ("ready", {"observation": env.observation_spec.cpu(), "action": env.full_action_spec.cpu(),
                         "reward": env.full_reward_spec.cpu(), "done": env.full_done_spec.cpu()}))
    while True:
        try:
            cmd, arg = _recv(conn)
        except EOFError:  # the parent closed the pipe or is gone: nothing left to serve
            env.close()
            return
        if cmd == "reset":
            _send(conn, _to_wire(env.reset()))
        elif cmd == "step":
            _send(conn, _to_wire(env.step(TensorDict({"action": torch.from_numpy(arg)}, batch_size=[])).get("next")))
        elif cmd == "pid":
            _send(conn, os.getpid())
        else:  # close
            env.close()
            _send(conn, None)
            return


class RobustEnvPool(EnvBase):
    """``start_method``: how workers start. ``spawn`` (default): a fresh interpreter each, which
    imports torch and torchrl again. ``forkserver``: workers fork from one server process that
    has imported them once (datamodules/env_worker_preload.py); as safe with CUDA and EGL as
    spawn, since the server initialises neither. Workers get the parent's environment variables
    of the moment they start either way; a forkserver has read its own (e.g. ``MUJOCO_GL`` when
    torchrl imported mujoco) when this process's first forkserver pool started it, so set the
    environment up before that (LIBERO pools: ``setup_libero``).

    Args:
        makers: one picklable env maker per slot (the pool's batch).
        step_timeout, reset_timeout: seconds a worker has to answer a step / a reset.
        start_method: ``spawn`` or ``forkserver``.
        start_timeout, start_retries: seconds a starting worker has to build its env, and how
            many times in a row a worker is started again before the pool gives up.
        spare_makers: makers of spare workers (see the module docstring); none by default.
        groups: one key per worker, slots first then spares: a spare takes over only a slot of
            its own group (LIBERO: the task). Default: one group.
    """

    def __init__(self, makers: list, step_timeout: float = 60.0, reset_timeout: float = 600.0,
                 start_method: str = "spawn", start_timeout: float = 300.0, start_retries: int = 2,
                 spare_makers: list = (), groups: list | None = None):
        n, workers = len(makers), len(makers) + len(spare_makers)
        if groups is not None and len(groups) != workers:
            raise ValueError(f"groups: {len(groups)} entries for {workers} workers (slots + spares)")
        super().__init__(batch_size=torch.Size([n]), device="cpu")
        self.makers = list(makers) + list(spare_makers)
        self.step_timeout, self.reset_timeout = step_timeout, reset_timeout
        self.start_timeout, self.start_retries = start_timeout, start_retries
        self.start_restarts = 0
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(["datamodules.env_worker_preload"])  # no effect once it runs
        # workers (processes) 0..n-1 start in the n slots, the rest as spares
        self._procs: list = [None] * workers
        self._conns: list = [None] * workers
        self._ready = [False] * workers
        self._groups = list(groups) if groups is not None else [0] * workers
        self._slot = list(range(n))  # slot -> its worker
        self._spares: dict[int, dict | None] = {}  # spare worker -> its reset's row (None: still resetting)
        self._spare_since: dict[int, float] = {}  # spare worker -> when its reset was asked for
        self.spare_swaps = 0  # episode starts served by a spare
        self._last: list[dict | None] = [None] * n  # each slot's last observation, as a flat row
        self._last_flags: list[dict | None] = [None] * n  # done flags and success of its last step
        self.failures = 0
        for i in range(workers):
            self._start(i)
        specs = None
        try:
            for i in range(workers):
                specs = self._await_ready(i)
        except RuntimeError:
            self.close()
            raise
        batched = [n]
        obs = specs["observation"].expand(*batched)
        obs[FAILED_KEY] = Categorical(2, (*batched, 1), dtype=torch.bool)
        self.observation_spec = obs
        self._obs_keys = {k if isinstance(k, tuple) else (k,) for k in obs.keys(True, True)}
        self.full_action_spec = specs["action"].expand(*batched)
        self.full_reward_spec = specs["reward"].expand(*batched)
        self.full_done_spec = specs["done"].expand(*batched)
        self._flag_keys = {k if isinstance(k, tuple) else (k,) for k in self.full_done_spec.keys()}
        if "success" in specs["observation"].keys() or "success" in specs.get("done", {}).keys():
            self._flag_keys.add(("success",))

    # -- worker lifecycle ---------------------------------------------------------------------
    def _start(self, i: int) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(self.makers[i], child, dict(os.environ)), daemon=True)
        proc.start()
        child.close()
        self._procs[i], self._conns[i], self._ready[i] = proc, parent, False

    def _await_ready(self, i: int) -> dict:
        """Worker i's specs, once it has built its env; a worker that dies or hangs meanwhile is
        started again (at most ``start_retries`` times in a row)."""
        for attempt in range(self.start_retries + 1):
            why = f"did not start within {self.start_timeout:g} s"
            if self._conns[i].poll(self.start_timeout):
                try:
                    _, specs = _recv(self._conns[i])
                    self._ready[i] = True
                    return specs
                except (EOFError, OSError):
                    self._procs[i].join(timeout=5)
                    why = f"died while starting (exit code {self._procs[i].exitcode})"
            if attempt == self.start_retries:
                raise RuntimeError(f"env worker {i} {why}, {attempt + 1} times in a row (its own error, if any, is "
                                   "printed above)")
            self.start_restarts += 1
            print(f"[env] worker {i} {why}: started again", flush=True)
            self._kill(i)
            self._start(i)

    def _restart(self, i: int, why: str) -> None:
        self.failures += 1
        print(f"[env] worker {i} {why}: restarted, its episode counted as failed", flush=True)
        self._kill(i)
        self._start(i)

    def _kill(self, i: int) -> None:
        proc = self._procs[i]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        self._conns[i].close()

    def worker_pid(self, i: int) -> int:
        """The process id of the worker in slot ``i``."""
        return self._procs[self._slot[i]].pid

    # -- spares --------------------------------------------------------------------------------
    def _start_spare_reset(self, w: int) -> None:
        """Worker ``w`` becomes a spare: its reset runs while the pool steps (a worker still
        starting gets the reset once it is ready, in ``_poll_spare``)."""
        if self._ready[w]:
            try:
                _send(self._conns[w], ("reset", None))
            except (BrokenPipeError, OSError):
                pass  # dead: found when its answer is read
        self._spares[w], self._spare_since[w] = None, time.monotonic()

    def _poll_spare(self, w: int, timeout: float) -> bool:
        """Read spare ``w``'s reset if it is in (waiting up to ``timeout``). A spare that dies, or
        misses ``start_timeout`` / ``reset_timeout``, is started again (and resets once ready)."""
        if self._spares[w] is not None:
            return True
        conn, deadline = self._conns[w], time.monotonic() + timeout
        while True:
            try:
                if conn.poll(max(0.0, deadline - time.monotonic())):
                    message = _recv(conn)
                    if self._ready[w]:
                        self._spares[w] = message
                        return True
                    self._ready[w] = True  # its "ready" message: now its reset
                    self._start_spare_reset(w)
                    continue
                limit = self.reset_timeout if self._ready[w] else self.start_timeout
                if time.monotonic() - self._spare_since[w] < limit:
                    return False
                why = "timed out"
            except (EOFError, OSError):
                why = "died"
            self.start_restarts += 1
            print(f"[env] spare worker {w} {why}: started again", flush=True)
            self._kill(w)
            self._start(w)
            self._spare_since[w] = time.monotonic()
            return False

    def _take_spare(self, group) -> tuple[int, dict] | None:
        """A spare of ``group`` whose reset is done (the longest-waiting first), else None: waiting
        for a spare still resetting would serialise the episode starts that a lock-step pool
        otherwise runs side by side (bench/libero_pool.py)."""
        waiting = [w for w in self._spares if self._groups[w] == group]  # in the order they became spares
        for w in waiting:
            if self._poll_spare(w, 0.0):
                return w, self._spares.pop(w)
        return None  # none ready: the slot resets its own worker, at the same time as the other slots

    def _call(self, ids: list[int], msgs: list, timeout: float) -> dict[int, object]:
        """Send ``msgs[k]`` to worker ``ids[k]``; collect answers until the deadline. Workers that
        die or miss it are absent from the result."""
        for i, msg in zip(ids, msgs):
            try:
                _send(self._conns[i], msg)
            except (BrokenPipeError, OSError):
                pass  # dead: detected below (no answer)
        out, pending = {}, {self._conns[i]: i for i in ids}
        deadline = time.monotonic() + timeout
        while pending:
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for conn in ready:
                i = pending.pop(conn)
                try:
                    out[i] = _recv(conn)
                except (EOFError, OSError):
                    pass
        return out

    # -- EnvBase -------------------------------------------------------------------------------
    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        # timed on its own (``<phase>/env_reset``): in a lock-step pool every worker waits for it
        with phase("env_reset"):
            return self._reset_workers(tensordict)

    def _reset_workers(self, tensordict: TensorDictBase | None) -> TensorDictBase:
        mask = None
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(-1)
        ids = [i for i in range(self.batch_size[0]) if mask is None or bool(mask[i])]
        if mask is None:  # a whole reset: every worker not in a slot becomes a spare
            in_slots = set(self._slot)
            for w in range(len(self._procs)):
                if w not in in_slots and w not in self._spares:
                    self._start_spare_reset(w)
        got = {}
        for i in ids:
            taken = self._take_spare(self._groups[self._slot[i]]) if mask is not None and self._spares else None
            if taken is not None:  # the spare takes the slot; the slot's worker resets in the background
                old, (self._slot[i], got[i]) = self._slot[i], taken
                self._start_spare_reset(old)
                self.spare_swaps += 1
        rest = [i for i in ids if i not in got]
        for i in rest:
            if not self._ready[self._slot[i]]:
                self._await_ready(self._slot[i])
        answers = self._call([self._slot[i] for i in rest], [("reset", None)] * len(rest), self.reset_timeout)
        for i in rest:
            w = self._slot[i]
            if w not in answers:  # one retry on a fresh worker; a second failure is not transient
                self._restart(w, "failed to reset")
                self._await_ready(w)
                again = self._call([w], [("reset", None)], self.reset_timeout)
                if w not in again:
                    raise RuntimeError(f"env worker {w} failed to reset twice in a row")
                answers[w] = again[w]
            got[i] = answers[w]
        for i in ids:
            self._last[i] = self._observation(got[i])
            self._last_flags[i] = None
        return self._stack(reset=True)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        with phase("env_step"):
            return self._step_workers(tensordict)

    def _step_workers(self, tensordict: TensorDictBase) -> TensorDictBase:
        actions = tensordict.get("action")
        n = self.batch_size[0]
        actions = actions.detach().cpu().numpy()
        mask = tensordict.get("_step", None)  # torchrl's partial steps: only these workers step
        ids = list(range(n)) if mask is None else mask.reshape(-1).nonzero().flatten().tolist()
        got = self._call([self._slot[i] for i in ids], [("step", actions[i]) for i in ids], self.step_timeout)
        rows = []
        for i in range(n):
            w = self._slot[i]
            if i not in ids:
                row = self._idle_transition(i)
            elif w in got:
                row = got[w]
                self._last[i] = self._observation(row)
                self._last_flags[i] = {k: v for k, v in row.items() if k in self._flag_keys}
                row[(FAILED_KEY,)] = np.zeros(1, dtype=bool)
            else:
                alive = self._procs[w].is_alive()
                self._restart(w, "timed out" if alive else "died")
                row = self._failed_transition(i)
            rows.append(row)
        return _batch(rows).to(self.device)

    def _observation(self, row: dict) -> dict:
        """The observation part of a worker's flat row (what a failed step repeats)."""
        obs = {k: v for k, v in row.items() if k in self._obs_keys}
        obs[(FAILED_KEY,)] = np.zeros(1, dtype=bool)
        return obs

    def _idle_transition(self, i: int) -> dict:
        """Worker i left out of a partial step: its last observation, reward 0, and the done flags
        and success of its last step (all false when it has not stepped since its reset)."""
        row = dict(self._last[i])
        reward = self.full_reward_spec["reward"]
        row[("reward",)] = np.zeros(reward.shape[-1:], dtype=torch.empty(0, dtype=reward.dtype).numpy().dtype)
        flags = self._last_flags[i] or {k: np.zeros(1, dtype=bool) for k in self._flag_keys}
        row.update(flags)
        return row

    def _failed_transition(self, i: int) -> dict:
        """The last good observation, reward 0, ``done`` and ``truncated`` (when the env has it)
        true, ``terminated`` and ``success`` false: the same keys as the worker's own steps."""
        row = dict(self._last[i])
        row[(FAILED_KEY,)] = np.ones(1, dtype=bool)
        reward = self.full_reward_spec["reward"]
        row[("reward",)] = np.zeros(reward.shape[-1:], dtype=torch.empty(0, dtype=reward.dtype).numpy().dtype)
        for key in self.full_done_spec.keys():
            row[(key,)] = np.full(1, key in ("done", "truncated"), dtype=bool)
        if ("success",) in row:
            row[("success",)] = np.zeros(1, dtype=bool)
        return row

    def _stack(self, reset: bool) -> TensorDictBase:
        rows = [dict(r) for r in self._last]
        if reset:
            for key in self.full_done_spec.keys():
                for r in rows:
                    r[key if isinstance(key, tuple) else (key,)] = np.zeros(1, dtype=bool)
        return _batch(rows).to(self.device)

    def _set_seed(self, seed: int | None) -> None:
        pass  # each worker's maker carries its own seed

    def close(self, *, raise_if_closed: bool = True) -> None:
        """All workers are told first, then awaited: each closes its sim and GL context (slow
        for LIBERO) at the same time as the others, not one after another."""
        live = [i for i, conn in enumerate(self._conns) if conn is not None]
        for i in live:
            try:
                _send(self._conns[i], ("close", None))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 10
        for i in live:
            conn = self._conns[i]
            try:
                conn.poll(max(0.0, deadline - time.monotonic())) and _recv(conn)
            except (BrokenPipeError, EOFError, OSError):
                pass
            self._procs[i].join(timeout=5)
            if self._procs[i].is_alive():
                self._procs[i].kill()
            conn.close()
            self._conns[i] = None
        self.is_closed = True


def worker_restarts(env) -> dict[str, int]:
    """The restarts of the ``RobustEnvPool`` inside ``env`` (through wrappers: ``.env``, ``.base_env``):
    ``{"step": failed workers restarted mid-episode, "start": workers started again}``; zeros for
    in-process envs."""
    for _ in range(8):  # a few wrappers deep at most
        if env is None or isinstance(env, RobustEnvPool):
            break
        inner = getattr(env, "base_env", None)
        env = inner if inner is not None else getattr(env, "env", None)
    if not isinstance(env, RobustEnvPool):
        return {"step": 0, "start": 0}
    return {"step": env.failures, "start": env.start_restarts}
