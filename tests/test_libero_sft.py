"""Scripted demonstrations -> SFT -> RL on real LIBERO, at tiny size on CPU.

Two scripted demonstrations of LIBERO-Goal task 8 are written in LIBERO's HDF5 layout (32 px
cameras); the tests check the layout against LIBERO's create_dataset.py keys, that the actions
replay to success from the stored first state (what LIBERO's own dataset scripts do), that the
kit's RPRM reader and robomimic's SequenceDataset (LIBERO's BC loader) read them, the no-op
filter and the statistics; then SFT learns them (the loss falls), and ``train.py`` runs the SFT
config (2 steps, evaluation, export) and the RL config from that export (1 PPO iteration)."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("libero")
h5py = pytest.importorskip("h5py")
pytestmark = pytest.mark.libero

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTION = "put the bowl on the plate"
TINY_OPENVLA = {"words": [INSTRUCTION, "put the bowl on the stove"], "image_size": 28, "patch_size": 7,
                "vision_hidden_size": 16, "vision_depth": 2, "vision_heads": 2, "registers": 4,
                "hidden_size": 16, "layers": 1, "heads": 2}
STREAM = {"env": "libero", "suite": "libero_goal", "render_size": 32, "image_size": 28, "max_steps": 8}
KEY = "libero_goal_scripted"


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import write_libero_demos

    out = str(tmp_path_factory.mktemp("demos") / "libero_goal_scripted")
    assert write_libero_demos.main(["--tasks", "8", "--demos", "2", "--out", out, "--size", "32",
                                    "--init", "fixed", "--max_steps", "200", "--processes", "2",  # the worker pool
                                    "--action_noise", "0.05"]) == 0
    return out


def _file(demos):
    (path,) = glob.glob(os.path.join(demos, "*_demo.hdf5"))
    return path


def test_demo_file_has_libero_layout(demos):
    path = _file(demos)
    assert os.path.basename(path) == "put_the_bowl_on_the_plate_demo.hdf5"  # LIBERO's file name
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert {"env_name", "problem_info", "macros_image_convention", "bddl_file_name", "bddl_file_content",
                "env_args", "num_demos", "total"} <= set(data.attrs)
        assert json.loads(data.attrs["problem_info"])["language_instruction"] == INSTRUCTION
        assert json.loads(data.attrs["env_args"])["env_kwargs"]["bddl_file_name"] == data.attrs["bddl_file_name"]
        assert sorted(data) == ["demo_0", "demo_1"] and data.attrs["num_demos"] == 2
        total = 0
        for name in ("demo_0", "demo_1"):
            demo = data[name]
            T = demo.attrs["num_samples"]
            total += T
            assert 30 < T < 200
            assert set(demo["obs"]) == {"agentview_rgb", "eye_in_hand_rgb", "gripper_states", "joint_states",
                                        "ee_states", "ee_pos", "ee_ori"}
            for key in ("agentview_rgb", "eye_in_hand_rgb"):
                assert demo["obs"][key].shape == (T, 32, 32, 3) and demo["obs"][key].dtype == np.uint8
            shapes = {k: demo["obs"][k].shape for k in ("gripper_states", "joint_states", "ee_states", "ee_pos", "ee_ori")}
            assert shapes == {"gripper_states": (T, 2), "joint_states": (T, 7), "ee_states": (T, 6),
                              "ee_pos": (T, 3), "ee_ori": (T, 3)}
            actions = demo["actions"][()]
            assert actions.shape == (T, 7) and np.abs(actions).max() <= 1.0
            assert set(np.unique(actions[:, -1])) == {-1.0, 1.0}  # LIBERO's gripper: -1 open, +1 close
            assert demo["robot_states"].shape == (T, 9) and demo["states"].shape[0] == T
            assert demo["dones"][()].tolist() == [0] * (T - 1) + [1] and demo["rewards"][-1] == 1
            np.testing.assert_array_equal(demo.attrs["init_state"], demo["states"][0])
            np.testing.assert_allclose(demo["obs"]["ee_pos"][()], demo["robot_states"][:, 2:5])
        assert data.attrs["total"] == total


def test_actions_replay_to_success(demos):
    """As LIBERO's create_dataset.py and OpenVLA's regeneration do: set the first state, step
    the recorded actions, and the BDDL goal holds at the end (and not before the last step)."""
    from modules.experts.episode import make_raw_env

    with h5py.File(_file(demos), "r") as f:
        env = make_raw_env(f["data"].attrs["bddl_file_name"])
        for name in f["data"]:
            env.reset()
            env.set_init_state(f["data"][name]["states"][0])
            actions = f["data"][name]["actions"][()]
            success = []
            for a in actions:
                env.step(a)
                success.append(env.check_success())
            assert success[-1] and not any(success[:-1]), name
        env.close()


def test_rprm_reader_reads_them(demos):
    from modules.vla_rl.libero_demos import read_libero_demos

    trajectories = list(read_libero_demos(_file(demos)))
    assert len(trajectories) == 2
    for t in trajectories:
        assert t.instruction == INSTRUCTION and t.success
        assert t.images.shape[1:] == (32, 32, 3) and len(t.gripper) == len(t.images) == len(t.ee_pos)
        assert t.gripper.max() == 1.0 and t.gripper.min() == -1.0  # opens, closes on the bowl, opens


def test_robomimic_sequence_dataset_reads_them(demos):
    """LIBERO's lifelong BC loader is robomimic's SequenceDataset with these arguments
    (libero/lifelong/datasets.py get_dataset; robomimic is not a kit dependency)."""
    ObsUtils = pytest.importorskip("robomimic.utils.obs_utils")
    dataset = pytest.importorskip("robomimic.utils.dataset")
    modality = {"rgb": ["agentview_rgb", "eye_in_hand_rgb"], "low_dim": ["gripper_states", "joint_states"]}
    ObsUtils.initialize_obs_utils_with_obs_specs({"obs": modality})
    ds = dataset.SequenceDataset(
        hdf5_path=_file(demos), obs_keys=sum(modality.values(), []), dataset_keys=["actions"],
        load_next_obs=False, frame_stack=1, seq_length=1, pad_frame_stack=True, pad_seq_length=True,
        get_pad_mask=False, goal_mode=None, hdf5_cache_mode="low_dim", hdf5_use_swmr=False,
        hdf5_normalize_obs=None, filter_by_attribute=None)
    with h5py.File(_file(demos), "r") as f:
        assert ds.n_demos == 2 and len(ds) == f["data"].attrs["total"]
    item = ds[5]
    assert item["actions"].shape == (1, 7) and item["obs"]["agentview_rgb"].shape == (1, 32, 32, 3)
    assert item["obs"]["joint_states"].shape == (1, 7)


def test_no_noop_filter_is_openvla_s():
    from datamodules.libero_hdf5 import is_noop

    move, still_open, still_close = np.r_[0.1, 0, 0, 0, 0, 0, -1.0], np.r_[0.0] * 6 + [-1.0], np.r_[0.0] * 6 + [1.0]
    assert is_noop(still_open, None) and not is_noop(move, None)
    assert is_noop(still_open, move)            # nothing moves, gripper command unchanged
    assert not is_noop(still_close, move)       # the gripper closes: kept
    assert is_noop(np.r_[5e-5, 0, 0, 0, 0, 0, 1.0], still_close)


def test_statistics_are_openvla_s(demos):
    with open(os.path.join(demos, "dataset_statistics.json")) as f:
        stats = json.load(f)
    assert list(stats) == [KEY]
    a = stats[KEY]["action"]
    assert a["mask"] == [True] * 6 + [False]
    assert all(lo <= hi for lo, hi in zip(a["q01"], a["q99"]))
    assert a["min"][-1] == 0.0 and a["max"][-1] == 1.0  # OpenVLA's gripper: 0 closed, 1 open
    with h5py.File(_file(demos), "r") as f:
        assert stats[KEY]["num_transitions"] == f["data"].attrs["total"] and stats[KEY]["num_trajectories"] == 2


def test_sft_batches_match_the_env_pipeline(demos):
    """A demo frame in an SFT batch is the env's observation of the same rendered frame."""
    from datamodules.demo_data import DemoDataModule
    from datamodules.libero import openvla_stages
    from datamodules.libero_env import chw_frame

    dm = DemoDataModule([{**STREAM, "task_ids": [8]}], demos, batch_size=4, unnorm_key=KEY)
    dm.setup()
    with h5py.File(_file(demos), "r") as f:
        raw = f["data/demo_0/obs/agentview_rgb"][3]
        actions = f["data/demo_0/actions"][()]
    want = openvla_stages(chw_frame(raw)[None], ("jpeg", "resize"), 28, 95, True)[0]
    assert torch.equal(dm.frames[0][3], want)
    np.testing.assert_allclose(dm.targets[0][: len(actions), 0, :6].numpy(), actions[:, :6], rtol=1e-6)
    assert set(dm.targets[0][:, 0, 6].tolist()) == {0.0, 1.0}
    batch = dm.sample_batch()
    assert batch["image"].shape == (4, 3, 28, 28) and batch["instruction"] == [INSTRUCTION] * 4


def test_sft_frames_are_what_the_rl_env_observes(demos):
    """The first frame of demo 0 (written from stored initial state 0), through the SFT
    pipeline, equals the kit's LIBERO env's first observation from that state: SFT and RL see
    the same pixels."""
    from datamodules.demo_data import DemoDataModule
    from datamodules.libero import LIBERO_OPTIONS, worker_env

    dm = DemoDataModule([{**STREAM, "task_ids": [8]}], demos, batch_size=4, unnorm_key=KEY)
    dm.setup()
    options = {**LIBERO_OPTIONS, "render_size": 32, "image_size": 28}
    env = worker_env("libero_goal", 8, seed=0, max_steps=8, init_state_id=0, render_gpu=None, options=options)
    try:
        assert torch.equal(env.reset()["observation", "image"], dm.frames[0][0])
    finally:
        env.close()


@pytest.mark.parametrize("kind", ["token", "oft"])
def test_sft_loss_falls_on_the_demos(demos, kind):
    from datamodules.demo_data import DemoDataModule
    from modules.policy import OpenVLABackbone, TokenVLAPolicy
    from modules.policy.oft_vla import OFTPolicy
    from modules.sft_module import chunk_l1_loss, token_loss

    torch.manual_seed(0)
    backbone = OpenVLABackbone(config={**TINY_OPENVLA, "seed": 0})
    if kind == "token":
        policy = TokenVLAPolicy(backbone, action_tokens=7, action_bins=256, norm_stats=demos, unnorm_key=KEY)
        loss_fn, chunk, lr, steps, ratio = token_loss, 1, 1e-2, 60, 0.6
    else:
        policy = OFTPolicy(backbone, chunk_size=4, action_dim=7, head_hidden=32, norm_stats=demos, unnorm_key=KEY)
        loss_fn, chunk, lr, steps, ratio = chunk_l1_loss, 4, 3e-3, 40, 0.75
    dm = DemoDataModule([{**STREAM, "task_ids": [8]}], demos, batch_size=32, chunk_size=chunk, unnorm_key=KEY)
    dm.setup()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        batch = dm.sample_batch()
        actions = batch["action"][:, 0] if kind == "token" else batch["action"]
        loss, _ = loss_fn(policy, batch["image"], policy.encode(batch["instruction"]), actions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if kind == "token":
        assert np.mean(losses[-5:]) < ratio * np.mean(losses[:5]), losses  # from ln(256) = 5.5
    else:  # at this size the chunk head reaches the L1 of the best constant chunk (the targets' median)
        from modules.sft_module import normalize_actions

        targets = torch.cat([normalize_actions(dm.sample_batch()["action"].float(), *policy.norm) for _ in range(20)])
        constant = (targets - targets.flatten(0, 1).median(0).values).abs().mean().item()
        assert np.mean(losses[-5:]) < min(ratio * losses[0], 1.05 * constant), (losses, constant)


def test_sft_checkpoint_loads_safely_and_resumes_exactly(demos, tmp_path):
    """An SFT run stopped after its first iteration and resumed from last.ckpt (loaded with
    weights_only=True by the kit's checkpoint plugin) ends with the uninterrupted run's weights,
    bit for bit: the demo sampler's generator, the global RNGs and the optimizer come back."""
    from lightning import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from datamodules.demo_data import DemoDataModule
    from modules.checkpoint_io import KitCheckpointIO
    from modules.policy import OpenVLABackbone, TokenVLAPolicy
    from modules.sft_module import SFTModule

    def run(name, epochs, ckpt=None):
        seed_everything(0, verbose=False)
        policy = TokenVLAPolicy(OpenVLABackbone(config={**TINY_OPENVLA, "seed": 0}), action_tokens=7,
                                action_bins=256, norm_stats=demos, unnorm_key=KEY)
        module = SFTModule(policy, lr=1e-3, warmup_steps=2)
        dm = DemoDataModule([{**STREAM, "task_ids": [8]}], demos, batch_size=4, steps_per_iteration=2,
                            random_crop=True, unnorm_key=KEY)
        trainer = Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                          default_root_dir=str(tmp_path / name), plugins=[KitCheckpointIO()],
                          callbacks=[ModelCheckpoint(dirpath=str(tmp_path / name), every_n_epochs=1, save_top_k=1,
                                                     filename="last", enable_version_counter=False)])
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        return module

    whole = run("whole", 2)
    run("stopped", 1)
    resumed = run("stopped", 2, str(tmp_path / "stopped" / "last.ckpt"))
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert not torch.equal(whole.policy.backbone.model.lm_head.weight,
                           run("fresh", 1).policy.backbone.model.lm_head.weight)  # the second iteration moved them


def _overlay(tmp_path, name: str, content: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def _logger(tmp_path, name):
    return {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(tmp_path / "runs"), "name": name}}


def _evaluation(**kw):
    return {"class_path": "callbacks.evaluation.PerTaskEvaluation",
            "init_args": {"episodes_per_task": 1, "num_envs": 1, "greedy": True, "max_steps": 8, **kw}}


@pytest.fixture(scope="module")
def sft_run(demos, tmp_path_factory):
    """configs/sft_libero_small.yaml through train.py at tiny size (2 SFT steps, 32 px): the
    export folder and the run's metrics.json."""
    from conftest import run_train

    tmp_path = tmp_path_factory.mktemp("sft")
    export = str(tmp_path / "sft_policy")
    sft = _overlay(tmp_path, "sft", {
        "trainer": {"accelerator": "cpu", "precision": "32-true", "enable_progress_bar": False,
                    "logger": _logger(tmp_path, "sft"),
                    "callbacks": [{"class_path": "callbacks.task_switch.TaskSwitch",
                                   "init_args": {"iterations_per_task": 1}}, _evaluation(evaluate_before=False),
                                  {"class_path": "callbacks.export_policy.ExportPolicy", "init_args": {"path": export}}]},
        "model": {"policy": {"init_args": {"backbone": {"init_args": {"config": TINY_OPENVLA}}, "norm_stats": demos}},
                  "warmup_steps": 0},
        "data": {"stream": [{**STREAM, "task_ids": [8]}], "demos": demos, "batch_size": 4, "steps_per_iteration": 2}})
    res = run_train("--config", "configs/sft_libero_small.yaml", "--config", sft, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    (metrics,) = glob.glob(str(tmp_path / "runs" / "sft" / "version_*" / "metrics.json"))
    return export, metrics


@pytest.mark.slow
def test_sft_then_rl_through_train_py(sft_run, tmp_path):
    """configs/sft_libero_small.yaml (2 SFT steps, tiny model, 32 px) -> its export ->
    configs/crl_libero_small.yaml from it (1 PPO iteration; the anchors' path is libero_smoke's),
    its starting score taken from the SFT run's metrics.json."""
    from conftest import run_train

    export, metrics = sft_run
    m = json.load(open(metrics))
    # the from-scratch model is not scored (evaluate_before: false): no b, no "before" row in R.csv
    assert m["complete"] and m["b"] is None and len(m["R"]) == 1
    assert [line.split(",")[0] for line in open(metrics.replace("metrics.json", "R.csv")).read().splitlines()] == ["row", "after_task0"]
    assert {"config.json", "dataset_statistics.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(export))
    assert list(json.load(open(os.path.join(export, "dataset_statistics.json")))) == [KEY]

    rl = _overlay(tmp_path, "rl", {
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "logger": _logger(tmp_path, "rl"),
                    "callbacks": [{"class_path": "callbacks.task_switch.TaskSwitch",
                                   "init_args": {"iterations_per_task": 1}}, _evaluation(evaluate_before=metrics)]},
        "model": {"policy": {"init_args": {"backbone": {"init_args": {"pretrained": export}}, "norm_stats": export}},
                  "critic_hidden_sizes": [16, 16], "critic_warmup_iterations": 0},
        "data": {"stream": [{**STREAM, "task_ids": [8]}], "num_envs": 1, "frames_per_batch": 8,
                 "ppo_epochs": 1, "num_minibatches": 1}})
    res = run_train("--config", "configs/crl_libero_small.yaml", "--config", rl, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    sft_score = m["R"][-1]
    (metrics,) = glob.glob(str(tmp_path / "runs" / "rl" / "version_*" / "metrics.json"))
    m = json.load(open(metrics))
    # the starting model's score b is the SFT run's final score (evaluate_before: its metrics.json)
    assert m["complete"] and [len(r) for r in m["R"]] == [1] and m["b"] == sft_score


@pytest.mark.slow
def test_rprm_then_vla_rl_through_the_small_configs(demos, sft_run, tmp_path):
    """configs/rprm_libero_small.yaml: the RPRM from the SFT export, trained on the demos'
    pseudo-labels (scripts/train_rprm.py, 1 epoch; held-out AUROC logged); then
    configs/vla_rl_libero_small.yaml over configs/crl_libero_small.yaml: one joint PPO iteration
    whose reward the RPRM shapes (its score logged, the sparse reward kept apart)."""
    import sys

    from conftest import run_train

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import train_rprm
    from run_scalars import per_iteration

    export, metrics = sft_run
    rprm_runs = tmp_path / "rprm_runs"
    rprm = _overlay(tmp_path, "rprm", {
        "trainer": {"accelerator": "cpu", "precision": "32-true", "max_epochs": 1, "enable_progress_bar": False,
                    "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(rprm_runs), "name": "rprm", "version": ""}}},
        "model": {"rprm": {"init_args": {"backbone": {"init_args": {"pretrained": export}}}}},
        "data": {"data_dir": str(tmp_path / "rprm_data"), "demos": [os.path.join(demos, "*_demo.hdf5")],
                 "heldout_fraction": 0.5, "batch_size": 16}})
    assert train_rprm.main(["--config", "configs/rprm_libero_small.yaml", "--config", rprm]) == 0
    checkpoint = rprm_runs / "rprm" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    (auroc,) = per_iteration(str(rprm_runs / "rprm"), "val/auroc")
    assert 0.0 <= auroc <= 1.0

    # data.reward_shaping is one dict (the RPRM's spec inside it is not merged key by key): the
    # config's, with the tiny export and the checkpoint just trained
    shaping = yaml.safe_load(open(os.path.join(ROOT, "configs", "vla_rl_libero_small.yaml")))["data"]["reward_shaping"]
    rprm_spec = shaping["rprm"]
    rprm_spec["init_args"]["backbone"]["init_args"]["pretrained"] = export
    vla_rl = _overlay(tmp_path, "vla_rl", {
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "logger": _logger(tmp_path, "vla_rl"),
                    "callbacks": [{"class_path": "callbacks.task_switch.TaskSwitch",
                                   "init_args": {"iterations_per_task": 1}},
                                  _evaluation(evaluate_before=metrics, task_ends="last")]},
        "model": {"policy": {"init_args": {"backbone": {"init_args": {"pretrained": export}}, "norm_stats": export}},
                  "critic_hidden_sizes": [16, 16], "critic_warmup_iterations": 0},
        "data": {"stream": [{**STREAM, "task_ids": [8]}], "num_envs": 1, "frames_per_batch": 8,
                 "ppo_epochs": 1, "num_minibatches": 1,
                 "reward_shaping": {**shaping, "rprm": rprm_spec, "checkpoint": str(checkpoint)}}})
    res = run_train("--config", "configs/crl_libero_small.yaml", "--config", "configs/vla_rl_libero_small.yaml",
                    "--config", vla_rl, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "vla_rl" / "version_*"))
    assert per_iteration(run_dir, "rollout/rprm_active") == [1.0]
    (score,) = per_iteration(run_dir, "rollout/rprm_score")
    assert 0.0 < score < 1.0
    assert json.load(open(os.path.join(run_dir, "metrics.json")))["complete"]
