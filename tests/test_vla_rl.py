"""VLA-RL wired into train.py: reward shaping in a real run follows its formula, the online RPRM
builds a dataset, trains and turns shaping on, the curriculum and shaping states survive a
resume, the smoke config runs end to end, every new YAML parses, bad knobs give one line."""
import glob
import json
import os

import pytest
import torch
from conftest import ROOT, print_config, run_train, run_train_cases
from omegaconf import OmegaConf

SMOKE = os.path.join(ROOT, "configs", "vla_rl_smoke.yaml")


def vla_rl_config(tmp_path, name, iterations=1, online=None, extra=None, extra_callbacks=None, ckpt_every=False):
    """configs/vla_rl_smoke.yaml shrunk to seconds: 2 tasks in one joint stage (2 blocks of
    ``iterations``), 6 envs x 16 steps, 8-step episodes, 4 evaluation episodes per task.
    ``online``: OnlineRPRM's init_args to override, or None to drop the callback."""
    cfg = OmegaConf.load(SMOKE)
    cfg.trainer.logger.init_args.save_dir = str(tmp_path / "runs")
    cfg.trainer.logger.init_args.name = name
    cfg.trainer.enable_progress_bar = False
    cbs = []
    for cb in cfg.trainer.callbacks:
        path = cb.class_path
        if path.endswith("TaskSwitch"):
            cb.init_args.iterations_per_task = iterations
        if path.endswith("OnlineRPRM"):
            if online is None:
                continue
            cb.init_args = OmegaConf.merge(cb.init_args, online)
        if path.endswith("PerTaskEvaluation"):
            cb.init_args.update(episodes_per_task=4, num_envs=4, max_steps=16)
        if path.endswith("TaskProgressBar"):
            continue
        cbs.append(cb)
    if ckpt_every:
        cbs.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_epochs": 1, "save_top_k": -1, "save_last": True}})
    cfg.trainer.callbacks = cbs + list(extra_callbacks or [])
    cfg.data.stream = cfg.data.stream[:2]
    for entry in cfg.data.stream:
        entry.max_steps = 8
    cfg.data.update(num_envs=6, frames_per_batch=96, ppo_epochs=1, num_minibatches=2)
    for key, value in (extra or {}).items():
        OmegaConf.update(cfg, key, value)
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(cfg, path)
    return str(path)


def log_dir_of(tmp_path, name, version=None):
    dirs = sorted(glob.glob(str(tmp_path / "runs" / name / "version_*")))
    assert dirs, f"no run dir for {name}"
    return dirs[-1] if version is None else dirs[version]


def scalars(log_dir) -> dict[str, list[float]]:
    """TensorBoard scalars of a run, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]
            for tag in acc.Tags()["scalars"]}


def rprm_checkpoint(path):
    """An RPRMModule-style checkpoint of the smoke config's RPRM with a random head that spreads
    the scores (what scripts/train_rprm.py would write; only ``state_dict`` is read)."""
    from datamodules.reward_shaping import build_rprm

    spec = OmegaConf.to_container(OmegaConf.load(SMOKE).data.reward_shaping.rprm)
    torch.manual_seed(0)
    rprm = build_rprm(spec)
    with torch.no_grad():
        rprm.head[1].weight.normal_(0.0, 2.0)
    torch.save({"state_dict": {f"rprm.{k}": v for k, v in rprm.state_dict().items()}}, path)
    return str(path)


# -- reward shaping from a checkpoint ----------------------------------------------------------
def test_shaping_in_a_train_run_follows_the_formula(tmp_path):
    ckpt = rprm_checkpoint(tmp_path / "rprm.ckpt")
    scale, offset = 0.5, 0.2
    cfg = vla_rl_config(tmp_path, "shaped", extra={"data.reward_shaping.checkpoint": ckpt,
                                                   "data.reward_shaping.scale": scale,
                                                   "data.reward_shaping.offset": offset})
    res = run_train("--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    s = scalars(log_dir_of(tmp_path, "shaped"))
    assert s["rollout/rprm_active"] == [1.0, 1.0]
    for shaped, sparse, score in zip(s["rollout/reward_mean"], s["rollout/reward_sparse"], s["rollout/rprm_score"],
                                     strict=True):
        # means over the same B x T steps: mean(reward) = mean(sparse) + scale * (mean(score) - offset)
        assert shaped == pytest.approx(sparse + scale * (score - offset), abs=2e-6)
        assert abs(shaped - sparse) > 1e-3 and 0.0 < score < 1.0
    assert len(s["rollout/success"]) == 2
    # the RPRM's scoring has its own phase in the timing breakdown, inside the training loop's time
    rows = [r for r in json.load(open(os.path.join(log_dir_of(tmp_path, "shaped"), "timings.json")))
            if isinstance(r["iteration"], int)]
    assert len(rows) == 2 and all(r["time/reward_shaping"] > 0 for r in rows)
    frames = OmegaConf.load(cfg).data.frames_per_batch
    for r in rows:  # env steps/s of the loop: frames / (collection + RPRM scoring + targets + update)
        loop = r["time/collection"] + r["time/reward_shaping"] + r["time/rollout_targets"] + r["time/update"]
        assert r["perf/env_steps_per_s"] == pytest.approx(frames / loop)


# -- online RPRM, then a resume ------------------------------------------------------------------
ONLINE = {"collect_iterations": 2, "min_episodes": 6, "epochs": 2, "batch_size": 32, "heldout_fraction": 0.5}


def online_config(tmp, probe_name):
    probe = {"class_path": "tests.helpers.curriculum_probe.StateProbe", "init_args": {"out": str(tmp / probe_name)}}
    return vla_rl_config(tmp, "online", iterations=2, online=ONLINE, ckpt_every=True, extra_callbacks=[probe],
                         extra={"data.frames_per_batch": 192})  # 32 steps per env: enough successes


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online")
    res = run_train("--config", online_config(tmp, "probe0.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, log_dir_of(tmp, "online")


@pytest.mark.slow
def test_online_rprm_dataset_training_and_shaping(online_run):
    _, log_dir = online_run
    s = scalars(log_dir)
    n_episodes = s["rprm/episodes"][0]
    assert n_episodes >= ONLINE["min_episodes"]
    # 1. the pseudo-labelled dataset of the successful episodes (BabyAI: final-frames rule only,
    # final_k = 1 -> exactly one positive per episode; negative_stride 1 -> every frame kept)
    with open(os.path.join(log_dir, "rprm", "data", "index.json")) as f:
        index = json.load(f)
    splits = index["splits"]
    assert len(index["episodes"]) == n_episodes
    assert splits["train"]["episodes"] >= 1 and splits["heldout"]["episodes"] >= 1
    assert splits["train"]["positives"] + splits["heldout"]["positives"] == n_episodes
    assert s["rprm/train_frames"][0] == splits["train"]["frames"] > splits["train"]["positives"]
    assert index["labeler"]["final_k"] == 1
    # 2. a trained RPRM: optimiser steps were taken, held-out metrics logged
    rprm_ckpt = torch.load(os.path.join(log_dir, "rprm", "rprm.ckpt"), weights_only=False)
    assert rprm_ckpt["global_step"] > 0 and rprm_ckpt["epoch"] == ONLINE["epochs"]
    assert any(k.startswith("rprm.head.") for k in rprm_ckpt["state_dict"])
    assert 0 < splits["heldout"]["positives"] < splits["heldout"]["frames"]  # both classes held out
    assert 0.0 <= s["rprm/val_accuracy"][0] <= 1.0 and 0.0 <= s["rprm/val_auroc"][0] <= 1.0
    # 3. shaping off for the collection iterations, on afterwards (scale 0.1, offset 0.5)
    assert s["rollout/rprm_active"] == [0.0, 0.0, 1.0, 1.0]
    assert s["rollout/reward_mean"][:2] == pytest.approx(s["rollout/reward_sparse"][:2], abs=1e-7)
    assert len(s["rollout/rprm_score"]) == 2
    for shaped, sparse, score in zip(s["rollout/reward_mean"][2:], s["rollout/reward_sparse"][2:],
                                     s["rollout/rprm_score"], strict=True):
        assert shaped == pytest.approx(sparse + 0.1 * (score - 0.5), abs=2e-6)
    last = torch.load(os.path.join(log_dir, "checkpoints", "last.ckpt"), weights_only=False)
    assert last["OnPolicyDataModule"]["reward_shaping"]["checkpoint"] == os.path.join(log_dir, "rprm", "rprm.ckpt")
    assert s["curriculum/keys"] == [100.0] * 4  # 2 tasks x 50 layouts
    assert all(0 < e for e in s["curriculum/episodes"])


def test_rprm_quality_gate():
    from callbacks.rprm import OnlineRPRM, shaping_allowed

    assert shaping_allowed(0.77, None) and shaping_allowed(None, None)
    assert not shaping_allowed(0.77, 0.9) and shaping_allowed(0.9, 0.9) and shaping_allowed(1.0, 0.9)
    assert not shaping_allowed(None, 0.9) and not shaping_allowed(float("nan"), 0.9)
    with pytest.raises(ValueError, match=r"OnlineRPRM.min_auroc=1.5"):
        OnlineRPRM(min_auroc=1.5)


@pytest.mark.slow
def test_rprm_gate_in_a_run_follows_the_heldout_auroc(tmp_path):
    """min_auroc: 1.0 - shaping turns on after the collection iterations exactly when the
    trained RPRM's held-out AUROC is perfect; the log line and the scalars agree."""
    cfg = vla_rl_config(tmp_path, "gate", iterations=2, online={**ONLINE, "min_auroc": 1.0},
                        extra={"data.frames_per_batch": 192})
    res = run_train("--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    s = scalars(log_dir_of(tmp_path, "gate"))
    on = s["rprm/val_auroc"][0] >= 1.0
    assert s["rprm/shaping_on"] == [float(on)]
    assert s["rollout/rprm_active"] == [0.0, 0.0] + [float(on)] * 2
    assert ("shaping on" in res.stdout + res.stderr) == on


@pytest.mark.slow
def test_curriculum_and_shaping_state_survive_resume(online_run):
    tmp, log_dir = online_run
    mid = glob.glob(os.path.join(log_dir, "checkpoints", "epoch=2-*.ckpt"))  # after the RPRM's activation
    assert len(mid) == 1
    saved = torch.load(mid[0], weights_only=False)["OnPolicyDataModule"]
    assert sum(len(h) for h in saved["curriculum"]["curriculum"]["history"]) > 0
    res = run_train("--config", online_config(tmp, "probe1.json"), f"--ckpt_path={mid[0]}")
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp / "probe1.json") as f:
        probe = json.load(f)
    cur = saved["curriculum"]["curriculum"]
    assert probe["curriculum"] == {"keys": [list(k) for k in cur["keys"]], "history": cur["history"]}
    assert probe["shaping_active"] and probe["shaping_checkpoint"] == saved["reward_shaping"]["checkpoint"]
    resumed = log_dir_of(tmp, "online")
    assert resumed != log_dir
    assert not os.path.exists(os.path.join(resumed, "rprm"))  # trained before the checkpoint: not again
    s = scalars(resumed)
    assert s["rollout/rprm_active"] == [1.0]  # the one remaining iteration is shaped
    with open(os.path.join(resumed, "metrics.json")) as f:
        assert json.load(f)["complete"]


@pytest.mark.slow
def test_curriculum_is_shared_over_ddp_ranks(tmp_path):
    """2 CPU ranks: every rank records the finished episodes of both (gathered), so each logs
    twice the per-rank episode count and ends with the same curriculum."""
    cfg = vla_rl_config(tmp_path, "ddp", extra={"data.reward_shaping": None}, ckpt_every=True)
    res = run_train("--config", cfg, "--trainer.devices=2", "--trainer.strategy=ddp", fresh=True)
    assert res.returncode == 0, res.stderr[-3000:]
    log_dir = log_dir_of(tmp_path, "ddp")
    s = scalars(log_dir)
    # rollout/episodes: the mean over ranks of each rank's count; curriculum/episodes: the gathered count
    assert s["curriculum/episodes"] == [2 * e for e in s["rollout/episodes"]]
    state = torch.load(os.path.join(log_dir, "checkpoints", "last.ckpt"), weights_only=False)
    history = state["OnPolicyDataModule"]["curriculum"]["curriculum"]["history"]
    assert sum(len(h) for h in history) == sum(s["curriculum/episodes"])  # window 8 not yet full


# -- the smoke config end to end -------------------------------------------------------------------
@pytest.mark.slow
def test_vla_rl_smoke_runs_end_to_end(tmp_path):
    res = run_train("--config", SMOKE, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    log_dir = log_dir_of(tmp_path, "vla_rl_smoke")
    with open(os.path.join(log_dir, "metrics.json")) as f:
        m = json.load(f)
    assert m["complete"] and len(m["R"]) == 3 and all(len(r) == 3 for r in m["R"])
    assert os.path.isfile(os.path.join(log_dir, "rprm", "rprm.ckpt"))
    s = scalars(log_dir)
    assert s["rollout/rprm_active"][:5] == [0.0] * 5 and s["rollout/rprm_active"][-1] == 1.0
    assert len(s["curriculum/success_mean"]) == 30 and "rprm/val_auroc" in s
    assert "[rprm] trained on" in res.stdout + res.stderr


# -- configs and bad knobs ------------------------------------------------------------------------
ABLATIONS = {"no_rprm": "reward_shaping: null", "no_curriculum": "curriculum: null",
             "no_warmup": "critic_warmup_iterations: 0"}


@pytest.mark.parametrize("base", ["vla_rl_smoke", "vla_rl"])
@pytest.mark.parametrize("ablation", [None, *ABLATIONS])
def test_configs_parse_and_print(base, ablation):
    args = ["--config", os.path.join(ROOT, "configs", f"{base}.yaml")]
    if ablation:
        args += ["--config", os.path.join(ROOT, "configs", "ablations", f"vla_rl_{ablation}.yaml")]
    out = print_config(*args)
    assert "joint: true" in out and "TaskSwitch" in out
    for name, line in ABLATIONS.items():
        assert (line in out) == (name == ablation), (name, ablation)
    if base == "vla_rl":
        assert "OpenVLABackbone" in out and "libero_spatial" in out and "temperature: 1.6" in out


def test_sweep_budget_config_parses():
    out = print_config("--config", SMOKE, "--config", os.path.join(ROOT, "configs", "vla_rl_babyai_sweep.yaml"))
    assert "iterations_per_task: 40" in out and "frames_per_batch: 2048" in out
    assert "every_n_iterations: 10" in out and "target: green key" not in out


BAD = [
    (["--data.reward_shaping.checkpoint=/no/such/rprm.ckpt"], "data.reward_shaping.checkpoint", True),
    (["--data.reward_shaping.scael=0.1"], "data.reward_shaping.scael", True),
    (["--data.reward_shaping.rprm.init_args.lora=5"], "data.reward_shaping.rprm", True),
    ([], "data.reward_shaping.checkpoint", False),  # null checkpoint and no OnlineRPRM to train one
    (["--data.curriculum.window=0"], "data.curriculum.window", True),
    (["--data.curriculum.temp=1"], "data.curriculum.temp", True),
    (["--data.stream=[{env: babyai, level: GoToObjectRoom, target: red ball}]"],
     "data.stream[0].num_init_states", True),
    (["--data.stream=[{env: babyai, level: GoToObjectRoom, target: red ball, num_init_states: 0}]"],
     "data.stream[0].num_init_states", True),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every BAD case's run, each its own train.py process (forked after the imports): [(directory, result)]."""
    return run_train_cases(tmp_path_factory, BAD, lambda case, d: (
        "--config", vla_rl_config(d, "bad", online={} if case[2] else None), *case[0]))


@pytest.mark.parametrize("case", range(len(BAD)), ids=[" ".join(args) or "none" for args, _, _ in BAD])
def test_bad_knobs_one_line(bad_runs, case):
    _, key, _ = BAD[case]
    tmp_path, res = bad_runs[case]
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and key in last, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not glob.glob(str(tmp_path / "runs" / "**" / "metrics.json"), recursive=True)


def test_missing_openvla_checkpoint_one_line(tmp_path):
    res = run_train("--config", os.path.join(ROOT, "configs", "vla_rl.yaml"),
                    f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.accelerator=cpu",
                    "--trainer.devices=1", "--trainer.strategy=auto", timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    # the model is built first: its backbone's line names the key and the path (jsonargparse may
    # wrap it in a report over model.policy's union of classes, so it is looked up as a line)
    line = ("model.policy.init_args.backbone.init_args.pretrained="
            "'/path/to/openvla-7b-finetuned-libero-spatial': no such checkpoint directory")
    assert any(line in row for row in res.stderr.splitlines()), res.stderr[-2000:]
