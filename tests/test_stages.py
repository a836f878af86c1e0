"""Multi-task stages: a stream entry that trains several tasks jointly, with every method."""
import numpy as np
import pytest
import torch
from lightning import Callback, Trainer

from callbacks.anchor import AnchorCriticFreeze
from callbacks.evaluation import PerTaskEvaluation
from callbacks.task_switch import TaskSwitch
from datamodules.on_policy import OnPolicyDataModule
from datamodules.tasks import instructions_of, make_env, parse_stream
from modules.crl_module import CRLModule


def _babyai(target, **kw):
    return {"env": "babyai", "level": "GoToObjectRoom", "target": target, **kw}


STAGED = [{"stage": [_babyai("red ball"), _babyai("green key")]}, _babyai("blue box")]


def test_a_stage_entry_parses_to_one_task_with_its_subtasks():
    stage, single = parse_stream(STAGED)
    assert [t.target for t in stage.subtasks] == ["red ball", "green key"] and not single.subtasks
    assert stage.name == "GoToObjectRoom:red ball + GoToObjectRoom:green key"
    assert stage.instructions == ["go to the red ball", "go to the green key"]
    assert single.instructions == ["go to the blue box"] and stage.instruction is None


@pytest.mark.parametrize("entry, key", [
    ({"stage": []}, "data.stream[0].stage"),
    ({"stage": [_babyai("red ball"), _babyai("green key", max_steps=9)]}, "data.stream[0].stage"),
    ({"stage": [{"stage": [_babyai("red ball")]}]}, "data.stream[0].stage"),
    ({"stage": [_babyai("red ball")], "env": "babyai"}, "data.stream[0].env"),
    ({"stage": [_babyai("purple ball")]}, "data.stream[0].stage[0].target"),
])
def test_bad_stage_entries_name_the_key(entry, key):
    with pytest.raises(ValueError) as err:
        parse_stream([entry])
    assert str(err.value).startswith(key + "=")


def test_stage_env_pins_episode_e_to_task_e_mod_k():
    stage = parse_stream(STAGED)[0]
    env = make_env(stage, 3, seed=0, init_state_ids=[1, 2, 5])  # episodes 1, 2, 5 (e.g. a DDP rank's)
    td = env.reset()
    assert instructions_of(td) == ["go to the green key", "go to the red ball", "go to the green key"]
    env = make_env(stage, 4, seed=0)  # training: env i on task i mod K
    assert instructions_of(env.reset()) == ["go to the red ball", "go to the green key"] * 2


class _Instructions(Callback):
    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(sorted(set(trainer.datamodule._last_instructions)))


@pytest.mark.parametrize("joint", [False, True])
def test_crl_and_mtl_over_a_staged_stream(tiny_policy, tmp_path, joint):
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], alpha=1.0, beta_v=1.0)
    dm = OnPolicyDataModule(STAGED, num_envs=4, frames_per_batch=32, ppo_epochs=1, num_minibatches=1, joint=joint)
    seen, evaluation = _Instructions(), PerTaskEvaluation(episodes_per_task=4, num_envs=4, max_steps=16)
    Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path),
            callbacks=[TaskSwitch(iterations_per_task=1, save_checkpoints=False), AnchorCriticFreeze(), seen,
                       evaluation]).fit(module, datamodule=dm)
    red, green, blue = (f"go to the {t}" for t in ("red ball", "green key", "blue box"))
    # stage 0 trains both of its tasks at once (MTL: every task of the stream in every stage)
    assert seen.seen == ([[blue, green, red]] * 2 if joint else [[green, red], [blue]])
    # one boundary, one head for both goals of the stage
    assert len(module.anchor_critics) == 1 and dm.anchor_goals == [red, green] and dm.anchor_heads == [0, 0]
    # one row and column of R per stage
    assert len(evaluation.R) == 2 and all(len(r) == 2 for r in evaluation.R)


def test_evaluation_of_the_final_model_only(tiny_policy, tmp_path):
    """evaluate_before: false, task_ends: last: one score, after the stream's last task (an SFT
    run cut into blocks); the other rows stay null, the run is complete, no continual metrics."""
    import json

    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16])
    dm = OnPolicyDataModule([_babyai("red ball"), _babyai("green key")], num_envs=4, frames_per_batch=32,
                            ppo_epochs=1, num_minibatches=1)
    evaluation = PerTaskEvaluation(episodes_per_task=4, num_envs=4, max_steps=16, evaluate_before=False,
                                   task_ends="last")
    Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path),
            callbacks=[TaskSwitch(iterations_per_task=1, save_checkpoints=False), evaluation]).fit(module, datamodule=dm)
    assert evaluation.b is None and evaluation.R[0] is None and len(evaluation.R[1]) == 2
    res = json.load(open(tmp_path / "metrics.json"))
    assert res["complete"] and "metrics" not in res and res["R"][0] is None
    assert [line.split(",")[0] for line in open(tmp_path / "R.csv").read().splitlines()] == ["row", "after_task1"]
    with pytest.raises(ValueError, match=r"^PerTaskEvaluation.task_ends='first'"):
        PerTaskEvaluation(task_ends="first")


def test_starting_score_from_the_run_that_trained_the_model(tiny_policy, tmp_path):
    """evaluate_before: <metrics.json>: b is the earlier run's final score (no evaluation of the
    starting model), so forward transfer is defined; a score of other episodes is one error line."""
    import json

    def run(folder, evaluation):
        torch.manual_seed(0)
        module = CRLModule(tiny_policy(), critic_hidden_sizes=[16])
        dm = OnPolicyDataModule([_babyai("red ball"), _babyai("green key")], num_envs=4, frames_per_batch=32,
                                ppo_epochs=1, num_minibatches=1)
        Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(folder),
                callbacks=[TaskSwitch(iterations_per_task=1, save_checkpoints=False), evaluation]).fit(module,
                                                                                                    datamodule=dm)
        return evaluation

    first = run(tmp_path / "sft", PerTaskEvaluation(episodes_per_task=4, num_envs=4, max_steps=16,
                                                    evaluate_before=False, task_ends="last"))
    earlier = str(tmp_path / "sft" / "metrics.json")
    second = run(tmp_path / "rl", PerTaskEvaluation(episodes_per_task=4, num_envs=4, max_steps=16,
                                                    evaluate_before=earlier))
    assert second.b == first.R[1] and all(r is not None for r in second.R)
    res = json.load(open(tmp_path / "rl" / "metrics.json"))
    assert res["b"] == first.R[1] and res["metrics"]["FT"] is not None
    assert open(tmp_path / "rl" / "R.csv").read().splitlines()[1].startswith("before,")
    with pytest.raises(ValueError, match=r"^PerTaskEvaluation.evaluate_before='.*': its episodes_per_task is 4, "
                                         r"this evaluation's 8$"):
        run(tmp_path / "rl8", PerTaskEvaluation(episodes_per_task=8, num_envs=4, max_steps=16, evaluate_before=earlier))


def test_one_pool_evaluation_scores_what_per_task_pools_score(tiny_policy, tmp_path):
    """one_pool: every task's episodes in one pool of 4 envs (2 workers per task, 5 fixed
    initial states each, played back to back) gives the per-task pools' greedy successes, b and
    every row of R; the two videos per task are the same episodes' frames."""
    import json
    import os

    from helpers.videos import read_mp4

    stream = [_babyai("red ball", num_init_states=10), _babyai("green key", num_init_states=10)]

    def run(folder, one_pool):
        torch.manual_seed(0)
        module = CRLModule(tiny_policy(), critic_hidden_sizes=[16])
        dm = OnPolicyDataModule(stream, num_envs=4, frames_per_batch=32, ppo_epochs=1, num_minibatches=1)
        evaluation = PerTaskEvaluation(episodes_per_task=10, num_envs=4, greedy=True, max_steps=40,
                                       videos_per_task=2, one_pool=one_pool)
        Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(folder),
                callbacks=[TaskSwitch(iterations_per_task=1, save_checkpoints=False), evaluation]).fit(module,
                                                                                                    datamodule=dm)
        return json.load(open(folder / "metrics.json"))

    per_task, pooled = run(tmp_path / "per_task", False), run(tmp_path / "pooled", True)
    assert pooled["b"] == per_task["b"] and pooled["R"] == per_task["R"]
    assert sum(per_task["b"]) + sum(map(sum, per_task["R"])) > 0  # some episodes succeed: the test can fail
    for when in ("before", "after_task1"):
        for name in ("task0_ep0.mp4", "task1_ep1.mp4"):
            a, b = (read_mp4(str(tmp_path / run / "videos" / when / name)) for run in ("per_task", "pooled"))
            assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match=r"^PerTaskEvaluation.one_pool=true: BabyAI tasks need fixed initial"):
        PerTaskEvaluation(one_pool=True)._check_one_pool(
            OnPolicyDataModule([_babyai("red ball")], num_envs=1).tasks)
    assert os.path.isdir(tmp_path / "pooled" / "videos")


@pytest.mark.parametrize("one_pool", [False, True])
def test_an_evaluation_cut_short_goes_on_where_it_stopped(tiny_policy, tmp_path, one_pool):
    """Every finished episode is on disk (eval_episodes/<label>.rank0.json) as it ends; the same
    evaluation of the same weights, run again, plays only the episodes with no outcome (one
    pool: each such episode; per-task pools: each batch with one) and scores the recorded ones
    as recorded; other weights start it over."""
    import json

    stream = [_babyai("red ball", num_init_states=10), _babyai("green key", num_init_states=10)]
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16])
    dm = OnPolicyDataModule(stream, num_envs=4, frames_per_batch=32, ppo_epochs=1, num_minibatches=1)
    evaluation = PerTaskEvaluation(episodes_per_task=10, num_envs=4, greedy=True, max_steps=40, one_pool=one_pool)
    trainer = Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      default_root_dir=str(tmp_path), callbacks=[TaskSwitch(iterations_per_task=1,
                                                                            save_checkpoints=False), evaluation])
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "eval_episodes" / "after_task1.rank0.json"
    saved = json.load(open(path))
    won = {(k, e): s for k, e, s in saved["episodes"]}
    assert sorted(won) == [(k, e) for k in (0, 1) for e in range(10)]
    assert evaluation.R[1] == [sum(won[k, e] for e in range(10)) / 10 for k in (0, 1)]
    assert 0 < sum(won.values()) < 20  # successes and failures: a flipped outcome shows

    # cut short after 7 episodes of task 0, recorded as successes whatever they were
    json.dump({"key": saved["key"], "episodes": [[0, e, True] for e in range(7)]}, open(path, "w"))
    row = evaluation.evaluate_all(trainer, module, "after_task1")
    replayed = range(7, 10) if one_pool else range(4, 10)  # per-task pools: batch [4, 8) has no outcome for 7
    kept = [e for e in range(10) if e not in replayed]
    assert row == [(len(kept) + sum(won[0, e] for e in replayed)) / 10, evaluation.R[1][1]]
    assert len(json.load(open(path))["episodes"]) == 20

    with torch.no_grad():  # other weights: the recorded outcomes are not theirs
        next(module.parameters()).add_(1.0)
    evaluation.evaluate_all(trainer, module, "after_task1")
    assert json.load(open(path))["key"]["weights"] != saved["key"]["weights"]


@pytest.mark.parametrize("max_epochs", [1, -1])
def test_export_only_at_the_streams_end(tiny_policy, tmp_path, max_epochs):
    """ExportPolicy writes the policy when the stream ran to its end, never for a run stopped
    early (here by max_epochs after the first of two tasks; a signal stops it the same way)."""
    import os

    from callbacks.export_policy import ExportPolicy

    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16])
    dm = OnPolicyDataModule([_babyai("red ball"), _babyai("green key")], num_envs=4, frames_per_batch=32,
                            ppo_epochs=1, num_minibatches=1)
    Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
            default_root_dir=str(tmp_path), callbacks=[TaskSwitch(iterations_per_task=1, save_checkpoints=False),
                                                       ExportPolicy(str(tmp_path / "policy"))]).fit(module, datamodule=dm)
    assert os.path.isdir(tmp_path / "policy") == (max_epochs == -1)
