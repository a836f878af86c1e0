"""train.py end to end: bad input, a full tiny stream, 2-process DDP (exact resume: tests/test_exact_resume.py)."""
import glob
import json
import os

import pytest
import torch

from conftest import ROOT, print_config, run_train, run_train_cases, small_config
from helpers.videos import read_mp4

BAD = [
    ("--data.stream=[]", "data.stream"),
    ("--data.stream=[{env: foo, level: x}]", "data.stream[0].env"),
    ("--data.stream=[{env: babyai, level: NoSuchLevel}]", "data.stream[0].level"),
    ("--data.stream=[{env: babyai, level: GoToObjectRoom, target: red ball, room_size: 2}]",
     "data.stream[0].room_size"),
    ("--data.frames_per_batch=0", "data.frames_per_batch"),
    ("--data.frames_per_batch=-8", "data.frames_per_batch"),
    ("--model.alpha=-1", "model.alpha"),
    ("--model.beta_v=-0.5", "model.beta_v"),
    ("--model.critic_type=w", "model.critic_type"),
    ("--model.q_advantage=td", "model.q_advantage"),
    ("--ckpt_path=/no/such/file.ckpt", "ckpt_path"),
    ("--model.policy.init_args.backbone.init_args.checkpoint=/no/such/vlm.pt",
     "model.policy.init_args.backbone.init_args.checkpoint"),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every BAD case's run, each its own train.py process (forked after the imports): [(directory, result)]."""
    return run_train_cases(tmp_path_factory, BAD, lambda case, d: ("--config", small_config(d), case[0]))


@pytest.mark.parametrize("case", range(len(BAD)), ids=[arg for arg, _ in BAD])
def test_bad_input_one_line_nonzero_no_results(bad_runs, case):
    _, key = BAD[case]
    tmp_path, res = bad_runs[case]
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and key in last, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not glob.glob(str(tmp_path / "runs" / "**" / "metrics.json"), recursive=True)
    assert not glob.glob(str(tmp_path / "runs" / "**" / "*.ckpt"), recursive=True)


def test_lightning_misconfiguration_is_one_line(tmp_path):
    # the quickstart lists TaskProgressBar: Lightning refuses it with the bar switched off
    res = run_train("--config", "configs/quickstart.yaml", "--trainer.enable_progress_bar=false",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "enable_progress_bar" in res.stderr
    assert "Traceback" not in res.stderr and not os.listdir(tmp_path)


def test_callback_error_is_the_kits_line(tmp_path):
    """A callback's bad argument fails inside jsonargparse's validation of the callback list,
    which wraps it in a paragraph of alternatives: the line printed is the kit's own message."""
    res = run_train("--config", small_config(tmp_path, switch={"success_window": 0}), timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: TaskSwitch.success_window=0: must be >= 1"], res.stderr[-2000:]
    assert not glob.glob(str(tmp_path / "runs" / "**" / "*.json"), recursive=True)


def _metrics(tmp_path, name, file="metrics.json"):
    paths = sorted(glob.glob(str(tmp_path / "runs" / name / "version_*" / file)))
    assert paths, f"no {file} written"
    with open(paths[-1]) as f:
        return json.load(f), os.path.dirname(paths[-1])


@pytest.mark.slow
def test_full_tiny_stream_writes_results(tmp_path):
    res = run_train("--config", small_config(tmp_path, "full", videos=2))
    assert res.returncode == 0, res.stderr[-3000:]
    m, log_dir = _metrics(tmp_path, "full")
    # evaluation videos: 2 episodes x 3 tasks, before training and after each task
    videos = sorted(glob.glob(os.path.join(log_dir, "videos", "*", "*.mp4")))
    assert len(videos) == 4 * 3 * 2, videos
    assert {os.path.basename(os.path.dirname(v)) for v in videos} == {"before", "after_task0", "after_task1", "after_task2"}
    assert not glob.glob(os.path.join(log_dir, "videos", "*", "*.part.mp4"))
    frames = read_mp4(videos[0])
    assert 1 <= len(frames) <= 64 and frames[0].shape == (56, 56, 3)
    assert m["complete"] and len(m["R"]) == 3 and all(len(r) == 3 for r in m["R"])
    assert set(m["metrics"]) == {"FAR", "BWT", "FT", "F", "FWT", "NBT", "AUC"}
    assert os.path.isfile(os.path.join(log_dir, "R.csv"))
    assert "FAR=" in res.stdout and "metrics.json" in res.stdout
    # the quickstart's second evaluation (greedy decoding, tag "greedy") writes its own files
    g, g_dir = _metrics(tmp_path, "full", "metrics_greedy.json")
    assert g_dir == log_dir and g["complete"] and g["greedy"] is True and m["greedy"] is False
    assert len(g["R"]) == 3 and set(g["metrics"]) == set(m["metrics"])
    assert os.path.isfile(os.path.join(log_dir, "R_greedy.csv")) and "metrics_greedy.json" in res.stdout
    assert len(glob.glob(os.path.join(log_dir, "videos_greedy", "*", "*.mp4"))) == 4 * 3 * 2
    assert {f"task{k}_end.ckpt" for k in range(3)} <= set(os.listdir(os.path.join(log_dir, "checkpoints")))
    # each task end says why it ended, and the iterations it used are a TensorBoard scalar
    out = res.stdout + res.stderr
    assert all(f"[task {k}] ends after 2 iterations: budget of 2 iterations" in out for k in range(3))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(log_dir)
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("task/iterations")] == [(0, 2.0), (1, 2.0), (2, 2.0)]


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    sums = tmp_path / "checksums"
    # a task may end early on the rollout success pooled over both ranks (every rank must end
    # it at the same iteration, or the collectives of the next iteration mismatch)
    cfg = small_config(tmp_path, "ddp", tasks=2, iterations=3, extra_callbacks=[
        {"class_path": "tests.helpers.weight_checksum.WeightChecksum", "init_args": {"out_dir": str(sums)}}],
        switch={"success_threshold": 0.05, "success_window": 2})
    res = run_train("--config", cfg, "--trainer.devices=2", "--trainer.strategy=ddp", fresh=True)
    assert res.returncode == 0, res.stderr[-3000:]
    m, log_dir = _metrics(tmp_path, "ddp")
    assert m["complete"] and len(m["R"]) == 2
    # evaluation split over ranks and gathered: 4 episodes -> multiples of 1/4
    for row in m["R"] + [m["b"]]:
        for v in row:
            assert abs(v * 4 - round(v * 4)) < 1e-9
    # ranks stayed in sync: the final checkpoint holds one set of weights
    ckpt = torch.load(os.path.join(log_dir, "checkpoints", "task1_end.ckpt"), weights_only=False)
    assert ckpt["crl"]["has_anchor"]
    # both tasks ended by the threshold after the 2-iteration window, not by the 3-iteration cap
    # (a near-random policy succeeds ~0.3 > 0.05): epochs 0-1 and 2-3
    first = torch.load(os.path.join(log_dir, "checkpoints", "task0_end.ckpt"), weights_only=False)
    assert (first["epoch"], ckpt["epoch"]) == (1, 3)
    assert "[task 0] ends after 2 iterations: rollout success" in res.stdout + res.stderr
    # gradients synced: the ranks collected different rollouts (own env seeds) yet end with
    # the same weights (policy, critic, anchor critic, old policy)
    rank0, rank1 = ((sums / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert rank0 == rank1


@pytest.mark.parametrize("configs", [["configs/quickstart.yaml"], ["configs/crl.yaml"],
                                     ["configs/quickstart.yaml", "configs/ablations/seq_ft.yaml",
                                      "configs/ablations/lora.yaml"],
                                     ["configs/quickstart.yaml", "configs/ablations/lora.yaml",
                                      "configs/ablations/per_task_adapters.yaml"],
                                     ["configs/quickstart.yaml", "configs/streams/babyai5.yaml"]])
def test_configs_parse_and_print(configs):
    """Base configs and stacks of ablations parse; the method is the last file's that sets one."""
    args = [a for c in configs for a in ("--config", os.path.join(ROOT, c))]
    out = print_config(*args)
    assert "model:" in out and "data:" in out and "stream:" in out
    method = ("method: null" if "configs/ablations/seq_ft.yaml" in configs
              else "class_path: callbacks.adapters.PerTaskAdapters" if "configs/ablations/per_task_adapters.yaml" in configs
              else "class_path: callbacks.anchor.AnchorCriticFreeze")
    assert method in out and out.count("AnchorCriticFreeze") == ("AnchorCriticFreeze" in method)
    assert ("r: 8" in out) == ("configs/ablations/lora.yaml" in configs)


def test_a_method_in_the_callback_list_and_in_method_is_one_clear_error(tmp_path):
    """An old-style config that lists AnchorCriticFreeze in trainer.callbacks, with an ablation
    that sets method: two methods would run; one line says so instead."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(small_config(tmp_path, "two", iterations=1, tasks=2))
    cfg.trainer.callbacks.insert(1, {"class_path": "callbacks.anchor.AnchorCriticFreeze"})
    OmegaConf.save(cfg, tmp_path / "two.yaml")
    res = run_train("--config", str(tmp_path / "two.yaml"), timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "error: method=callbacks.anchor.AnchorCriticFreeze: trainer.callbacks already holds a "
        "continual-learning method (AnchorCriticFreeze); keep one")


ABLATIONS = ["seq_ft", "ewc", "lwf", "crl_q", "crl_q_gae", "mtl", "er"]


@pytest.fixture(scope="module")
def ablation_runs(tmp_path_factory):
    """Each ablation's 2-task run, each its own train.py process (forked after the imports)."""
    runs = run_train_cases(tmp_path_factory, ABLATIONS, lambda ablation, d: (
        "--config", small_config(d, ablation, iterations=1, tasks=2, ablation=ablation)), timeout=900)
    return dict(zip(ABLATIONS, runs))


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_each_ablation_runs_one_iteration_per_task(ablation_runs, ablation):
    tmp_path, res = ablation_runs[ablation]
    assert res.returncode == 0, res.stderr[-3000:]
    path = glob.glob(str(tmp_path / "runs" / ablation / "version_*" / "metrics.json"))[0]
    m = json.load(open(path))
    assert m["complete"] and len(m["R"]) == 2 and len(m["R"][1]) == 2
    ckpt = torch.load(os.path.join(os.path.dirname(path), "checkpoints", "task1_end.ckpt"), weights_only=False)
    critic_in = ckpt["state_dict"]["critic.net.0.weight"].shape[1]  # [phi; emb] (+ onehot(a) for Q)
    assert critic_in == 2 * 32 + (3 if ablation.startswith("crl_q") else 0)
    assert ckpt["crl"]["has_anchor"] == (ablation in ("lwf", "crl_q", "crl_q_gae", "er"))
    if ablation == "er":  # the bounded memory of task 0's states went into the checkpoint
        memory = next(v for k, v in ckpt["datamodule_hyper_parameters"].items() if k == "anchor_source")
        assert memory == "memory"
        stored = ckpt["OnPolicyDataModule"]["memory"] if "OnPolicyDataModule" in ckpt else None
        assert stored is not None and len(stored["goal"]) > 0 and set(stored["goal"].tolist()) == {0}


@pytest.mark.slow
def test_evaluation_leaves_training_unchanged(tmp_path):
    """Sampled evaluation draws from its own seeded stream: evaluating 4 or 8 episodes per task
    (before training and at the task end) gives the same trained weights. (That the same policy
    gets the same sampled success each time: tests/test_lora.py, per-task adapters.)"""
    weights = []
    for episodes in (4, 8):
        cfg = small_config(tmp_path, f"eval{episodes}", iterations=2, tasks=1, eval_episodes=episodes)
        res = run_train("--config", cfg)
        assert res.returncode == 0, res.stderr[-3000:]
        m, log_dir = _metrics(tmp_path, f"eval{episodes}")
        assert m["greedy"] is False
        ckpt = torch.load(os.path.join(log_dir, "checkpoints", "task0_end.ckpt"), weights_only=False)
        weights.append({k: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
