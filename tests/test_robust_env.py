"""RobustEnvPool with cheap real workers (torchrl's ToyVLAEnv): the batched TensorDict it
assembles equals stepping the same envs in-process, and a killed worker's row is a failure
with the same keys (the LIBERO version of the kill test is in tests/test_libero.py)."""
import functools
import os
import signal
import time

import pytest
import torch
from torchrl.envs.custom import ToyVLAEnv

from datamodules.robust_env import RobustEnvPool
from datamodules.tasks import instructions_of

INSTRUCTIONS = ["pick the cup", "open the drawer", "pick the cup"]


def _make(seed: int, instruction: str):
    return ToyVLAEnv(action_dim=7, state_dim=8, from_pixels=True, render_size=32, batch_size=[], seed=seed,
                     instruction=instruction)


def _make_from_environ(seed: int):
    """A worker whose instruction is an environment variable, read when its env is built."""
    return _make(seed, os.environ["CRL_KIT_POOL_PROBE"])


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_pool_equals_in_process_envs_and_a_killed_worker_fails_its_row(start_method):
    makers = [functools.partial(_make, i, s) for i, s in enumerate(INSTRUCTIONS)]
    pool, local = RobustEnvPool(makers, step_timeout=20.0, start_method=start_method), [m() for m in makers]
    try:
        td = pool.reset()
        ref = [e.reset() for e in local]
        assert td.batch_size == (3,) and list(td["language_instruction"]) == INSTRUCTIONS
        assert not td["done"].any() and not td["env_failed"].any()
        gen = torch.Generator().manual_seed(0)
        for t in range(3):
            action = torch.rand(3, 7, generator=gen) * 2 - 1
            out = pool.step(td.set("action", action))["next"]
            ref = [e.step(r.set("action", action[i]))["next"] for i, (e, r) in enumerate(zip(local, ref))]
            for i in range(3):
                for key in (("observation", "image"), ("observation", "state"), "reward", "done"):
                    assert torch.equal(out[key][i], ref[i][key]), (t, i, key)
            assert list(out["language_instruction"]) == INSTRUCTIONS
            assert out["observation", "image"].dtype == torch.uint8 and out["reward"].dtype == torch.float32
            td = out
        last_state = td["observation", "state"][1].clone()
        os.kill(pool.worker_pid(1), signal.SIGKILL)
        out = pool.step(td.set("action", torch.zeros(3, 7)))["next"]
        assert out["env_failed"].squeeze(-1).tolist() == [False, True, False] and pool.failures == 1
        assert out["done"][1].item() and not out["terminated"][1].item() and "truncated" not in out.keys()
        assert out["reward"][1].item() == 0.0 and out["reward"].dtype == torch.float32
        assert torch.equal(out["observation", "state"][1], last_state)  # the last good observation
        assert list(out["language_instruction"]) == INSTRUCTIONS
        again = pool.reset(out.select().set("_reset", torch.tensor([[False], [True], [False]])))
        assert not again["env_failed"].any() and again["language_instruction"][1] == INSTRUCTIONS[1]
    finally:
        pool.close()


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_workers_get_the_environment_of_when_they_start(start_method, monkeypatch):
    """A forkserver's children would otherwise have the server's environment, from whenever an
    earlier pool started it: each pool's workers see the variables set just before it."""
    for probe in ("first", "second"):
        monkeypatch.setenv("CRL_KIT_POOL_PROBE", f"{start_method} {probe}")
        pool = RobustEnvPool([functools.partial(_make_from_environ, 0)], start_method=start_method)
        try:
            assert instructions_of(pool.reset()) == [f"{start_method} {probe}"]
        finally:
            pool.close()


def test_one_instruction_for_all_workers_is_one_non_tensor_value():
    """Workers that share an instruction give one ``NonTensorData`` for the batch (as BabyAIEnv
    does; stacking per-row values costs the main process on every step, docs/benchmarks.md);
    ``instructions_of`` reads both forms. Different ones stay a stack."""
    from tensordict import NonTensorData, NonTensorStack
    from torchrl.envs.utils import step_mdp

    same = RobustEnvPool([functools.partial(_make, i, "pick the cup") for i in range(3)])
    mixed = RobustEnvPool([functools.partial(_make, i, s) for i, s in enumerate(INSTRUCTIONS)])
    try:
        td = same.reset()
        assert isinstance(td.get("language_instruction"), NonTensorData)
        out = same.step(td.set("action", torch.zeros(3, 7)))
        assert instructions_of(out) == instructions_of(step_mdp(out)) == ["pick the cup"] * 3
        assert out[1]["next", "language_instruction"] == "pick the cup"
        assert isinstance(mixed.reset().get("language_instruction"), NonTensorStack)
        assert instructions_of(mixed.reset()) == INSTRUCTIONS
    finally:
        same.close()
        mixed.close()


def test_partial_steps_leave_the_other_workers_untouched():
    """torchrl's ``_step`` mask: the masked-out worker does not step (its env's later steps equal
    an env that skipped that step) and its row repeats its last observation and done flags with
    reward 0; the stepped workers equal in-process envs."""
    makers = [functools.partial(_make, i, s) for i, s in enumerate(INSTRUCTIONS)]
    pool, local = RobustEnvPool(makers, step_timeout=20.0), [m() for m in makers]
    try:
        td, ref = pool.reset(), [e.reset() for e in local]
        gen = torch.Generator().manual_seed(0)
        for t in range(4):
            action = torch.rand(3, 7, generator=gen) * 2 - 1
            mask = torch.tensor([True, t != 1, True])  # worker 1 rests at step 1
            before = td["observation", "state"][1].clone()
            out = pool.step(td.set("action", action).set("_step", mask))["next"]
            for i in range(3):
                if not mask[i]:
                    assert torch.equal(out["observation", "state"][i], before) and out["reward"][i].item() == 0.0
                    assert out["done"][i].item() == (t > 0 and bool(prev_done[i]))
                    continue
                ref[i] = local[i].step(ref[i].set("action", action[i]))["next"]
                for key in (("observation", "state"), ("observation", "image"), "reward", "done"):
                    assert torch.equal(out[key][i], ref[i][key]), (t, i, key)
            prev_done = out["done"].reshape(-1).clone()
            td = out
    finally:
        pool.close()


def test_the_pools_steps_and_resets_are_timed_phases():
    """Inside a phase (collection, evaluation) the pool's steps and resets are their own
    sub-phases, so a user sees how much of the env time is resets."""
    from modules.timing import TIMER, phase

    makers = [functools.partial(_make, i, s) for i, s in enumerate(INSTRUCTIONS[:2])]
    pool = RobustEnvPool(makers, step_timeout=20.0)
    try:
        TIMER.pop()
        with phase("collection"):
            td = pool.reset()
            for _ in range(3):
                td = pool.step(td.set("action", torch.zeros(2, 7)))["next"]
            pool.reset(td.select().set("_reset", torch.tensor([[True], [False]])))
        seconds = TIMER.pop()
        assert seconds["collection/env_reset"] > 0 and seconds["collection/env_step"] > 0
        assert seconds["collection"] >= seconds["collection/env_reset"] + seconds["collection/env_step"]
    finally:
        pool.close()


def _die_first_time(marker: str, seed: int):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)  # dies while it builds its env
    return _make(seed, INSTRUCTIONS[1])


def _hang_first_time(marker: str, seed: int):
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(600)  # hangs while it builds its env (a stuck EGL context, an import lock)
    return _make(seed, INSTRUCTIONS[2])


def _always_die():
    os._exit(5)


def test_workers_that_die_or_hang_while_starting_are_started_again(tmp_path):
    from torchrl.envs import TransformedEnv

    from datamodules.robust_env import worker_restarts

    RobustEnvPool([functools.partial(_make, 0, "warm up")], start_method="forkserver").close()  # the forkserver
    makers = [functools.partial(_make, 0, INSTRUCTIONS[0]), functools.partial(_die_first_time, str(tmp_path / "d"), 1),
              functools.partial(_hang_first_time, str(tmp_path / "h"), 2)]
    start = time.monotonic()
    pool = RobustEnvPool(makers, start_method="forkserver", start_timeout=15.0, start_retries=1)
    try:
        assert 15.0 <= time.monotonic() - start < 120.0  # waited out the hang once, not 600 s
        assert pool.start_restarts == 2 and pool.failures == 0
        td = pool.reset()
        assert list(td["language_instruction"]) == INSTRUCTIONS and not td["env_failed"].any()
        out = pool.step(td.set("action", torch.zeros(3, 7)))["next"]
        assert not out["env_failed"].any()
        # the counts the datamodule and the evaluation log, found through env wrappers
        assert worker_restarts(TransformedEnv(pool)) == {"step": 0, "start": 2}
        assert worker_restarts(_make(0, "in-process")) == {"step": 0, "start": 0}
    finally:
        pool.close()
    with pytest.raises(RuntimeError, match=r"env worker 0 died while starting \(exit code 5\), 2 times in a row"):
        RobustEnvPool([_always_die], start_method="forkserver", start_retries=1)


class _SlowResetToyEnv(ToyVLAEnv):
    """A toy env whose resets hang while ``marker`` exists."""

    def __init__(self, marker: str, **kwargs):
        super().__init__(**kwargs)
        self.marker = marker

    def _reset(self, tensordict=None, **kwargs):
        if os.path.exists(self.marker):
            time.sleep(120)
        return super()._reset(tensordict, **kwargs)


def _slow_reset(marker: str, seed: int, instruction: str):
    return _SlowResetToyEnv(marker, action_dim=7, state_dim=8, from_pixels=True, render_size=32, batch_size=[],
                            seed=seed, instruction=instruction)


def test_a_spare_worker_takes_the_slot_of_an_ended_episode(tmp_path):
    """Slot 0's episode ends: the spare (reset in advance, same group) takes the slot and its
    reset is that of an env built from its maker; slot 0's old worker resets in the background.
    A spare of another group is never used; with no spare ready a slot resets its own worker; a
    spare that dies while it resets is started again and serves once its reset is in."""
    marker = str(tmp_path / "hang")
    makers = [functools.partial(_slow_reset, marker, 0, INSTRUCTIONS[0]), functools.partial(_make, 1, INSTRUCTIONS[1])]
    spare = functools.partial(_make, 7, INSTRUCTIONS[0])
    pool = RobustEnvPool(makers, step_timeout=20.0, spare_makers=[spare], groups=["a", "b", "a"])
    local = [m() for m in makers] + [spare()]
    try:
        td, ref = pool.reset(), [e.reset() for e in local]
        pids = [pool.worker_pid(0), pool.worker_pid(1)]
        for i in range(2):
            assert torch.equal(td["observation", "state"][i], ref[i]["observation", "state"])
        gen = torch.Generator().manual_seed(0)

        def step(td, slots):  # the pool and the in-process envs now in its slots, one step
            action = torch.rand(2, 7, generator=gen) * 2 - 1
            out = pool.step(td.set("action", action))["next"]
            for i, e in enumerate(slots):
                ref[e] = local[e].step(ref[e].set("action", action[i]))["next"]
                assert torch.equal(out["observation", "state"][i], ref[e]["observation", "state"]), (i, e)
            return out

        td = step(td, [0, 1])
        td = pool.reset(td.select().set("_reset", torch.tensor([[False], [True]])))  # group b: no spare
        ref[1] = local[1].reset()
        assert pool.worker_pid(1) == pids[1] and pool.spare_swaps == 0
        assert torch.equal(td["observation", "state"][1], ref[1]["observation", "state"])
        open(marker, "w").close()  # slot 0's worker will hang in its next reset
        td = pool.reset(td.select().set("_reset", torch.tensor([[True], [False]])))  # the spare takes slot 0
        assert pool.spare_swaps == 1 and pool.worker_pid(0) not in pids
        assert torch.equal(td["observation", "state"][0], ref[2]["observation", "state"])  # the spare's own reset
        td = step(td, [2, 1])
        os.kill(pool._procs[0].pid, signal.SIGKILL)  # slot 0's old worker dies in its background reset
        pool._procs[0].join(timeout=30)
        os.remove(marker)
        spare_pid = pool.worker_pid(0)
        td = pool.reset(td.select().set("_reset", torch.tensor([[True], [False]])))  # no spare ready
        assert pool.spare_swaps == 1 and pool.start_restarts == 1 and pool.failures == 0
        assert pool.worker_pid(0) == spare_pid  # slot 0 reset its own worker
        ref[2] = local[2].reset()
        assert torch.equal(td["observation", "state"][0], ref[2]["observation", "state"])
        assert pool._poll_spare(0, 120.0)  # the fresh worker 0 starts, then resets
        td = pool.reset(td.select().set("_reset", torch.tensor([[True], [False]])))
        assert pool.spare_swaps == 2 and pool.worker_pid(0) not in (pids[0], spare_pid)
        assert torch.equal(td["observation", "state"][0], makers[0]().reset()["observation", "state"])
        td = pool.step(td.set("action", torch.zeros(2, 7)))["next"]
        assert not td["env_failed"].any()
    finally:
        pool.close()
