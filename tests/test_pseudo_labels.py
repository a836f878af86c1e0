"""Pseudo-labels land on the known frames (gripper events, the speed minimum, the last k), and
the labelled dataset on disk splits by episode and reads back exactly what was written."""
import numpy as np
import pytest
import torch

from modules.vla_rl.label_store import LabelledFrames, LabelledFrameWriter, build_dataset, read_index
from modules.vla_rl.libero_demos import instruction_from_filename
from modules.vla_rl.pseudo_labels import PseudoLabeler, Trajectory

T = 40


def _trajectory(success=True, episode="ep", hwc=True, seed=0):
    """Gripper closes at frame 10 and opens at 25; the end-effector speed (central differences of
    x(t) = (t - 30)^3 / 3 + t) is (t - 30)^2 + 4/3 inside: one minimum, at frame 30."""
    t = np.arange(T, dtype=float)
    gripper = np.where((t >= 10) & (t < 25), 1.0, -1.0)
    ee = np.stack([(t - 30) ** 3 / 3 + t, np.zeros(T), np.zeros(T)], -1)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (T, 8, 8, 3) if hwc else (T, 3, 8, 8), dtype=np.uint8)
    return Trajectory(images, gripper, ee, success, "put the bowl on the plate", episode)


def _frames(*ranges):
    return sorted({f for lo, hi in ranges for f in range(lo, hi + 1)})


def test_events_and_speed_minimum_are_found():
    lab = PseudoLabeler()
    traj = _trajectory()
    assert lab.gripper_events(traj.gripper).tolist() == [10, 25]
    speed = lab.speed(traj.ee_pos)
    assert speed[30] == pytest.approx(4 / 3) and speed[29] == pytest.approx(1 + 4 / 3)
    assert lab.speed_minima(traj.ee_pos).tolist() == [30]


def test_labels_land_on_the_expected_frames():
    lab = PseudoLabeler(gripper_window=2, speed_window=1, final_k=3)
    out = lab(_trajectory())
    # gripper 10 +- 2, 25 +- 2; speed minimum 30 +- 1; the last 3 frames
    assert np.flatnonzero(out.label).tolist() == _frames((8, 12), (23, 27), (29, 31), (37, 39))
    assert out.keep.all()  # negative_stride 1: every frame is kept


def test_offsets_windows_and_stride():
    lab = PseudoLabeler(gripper_window=1, gripper_offset=2, speed_window=0, speed_offset=-1, final_k=1,
                        negative_stride=4)
    out = lab(_trajectory())
    # gripper (10 + 2) +- 1, (25 + 2) +- 1; speed minimum 30 - 1; last frame 39
    positives = _frames((11, 13), (26, 28), (29, 29), (39, 39))
    assert np.flatnonzero(out.label).tolist() == positives
    assert np.flatnonzero(out.keep).tolist() == sorted(set(positives) | set(range(0, T, 4)))


def test_speed_threshold_absolute_and_relative():
    ee = _trajectory().ee_pos  # minimum speed 4/3, peak speed ~871 (at frame 0)
    assert PseudoLabeler(speed_relative=False, speed_threshold=1.0).speed_minima(ee).tolist() == []
    assert PseudoLabeler(speed_relative=False, speed_threshold=1.5).speed_minima(ee).tolist() == [30]
    assert PseudoLabeler(speed_threshold=1e-3).speed_minima(ee).tolist() == []  # 0.871 < 4/3
    # a plateau of zero speed counts once, at its first frame
    x = np.concatenate([np.arange(10.0), np.full(6, 9.0), 9 + np.arange(1, 11.0)])
    ee_plateau = np.stack([x, 0 * x, 0 * x], -1)
    assert PseudoLabeler(speed_order=2).speed_minima(ee_plateau).tolist() == [10]


def test_failed_trajectory_has_no_final_positives_and_is_not_written(tmp_path):
    lab = PseudoLabeler(gripper_window=0, speed_window=0, final_k=3)
    out = lab(_trajectory(success=False))
    assert np.flatnonzero(out.label).tolist() == [10, 25, 30]
    writer = LabelledFrameWriter(str(tmp_path), labeler=lab)
    assert writer.add_trajectory(_trajectory(success=False)) is None


def test_images_in_either_layout():
    a, b = _trajectory(hwc=True), _trajectory(hwc=False)
    assert a.images_chw().shape == (T, 3, 8, 8)
    assert np.array_equal(a.images_chw(), a.images.transpose(0, 3, 1, 2))
    assert b.images_chw() is b.images


def test_dataset_on_disk_round_trip_and_split_by_episode(tmp_path):
    lab = PseudoLabeler(gripper_window=1, speed_window=1, final_k=2, negative_stride=3)
    trajs = [_trajectory(success=(i != 3), episode=f"demo_{i}", seed=i) for i in range(11)]
    index = build_dataset(trajs, str(tmp_path), lab, heldout_fraction=0.2, shard_size=16)
    assert index["skipped_failed"] == 1
    # 10 successful episodes, in order; floor((i + 1) 0.2) > floor(i 0.2) holds out i = 4 and 9
    assert index["episodes"] == [f"demo_{i}" for i in range(11) if i != 3]
    assert index["splits"]["heldout"]["episodes"] == 2 and index["splits"]["train"]["episodes"] == 8
    assert read_index(str(tmp_path))["labeler"]["negative_stride"] == 3
    train, held = LabelledFrames(str(tmp_path), "train"), LabelledFrames(str(tmp_path), "heldout")
    assert sorted(set(held.data["episode"].tolist())) == [4, 9]
    assert not set(train.data["episode"].tolist()) & {4, 9}
    assert len(index["splits"]["train"]["shards"]) > 1  # several shards of <= 16 frames
    out = lab(trajs[0])
    per_episode = int(out.keep.sum())
    assert len(train) + len(held) == 10 * per_episode
    # episode index 4 is trajectory 5 (trajectory 3 failed): its frames and labels, exactly
    traj = trajs[5]
    rows = held.data["episode"] == 4
    kept = np.flatnonzero(out.keep)
    assert held.data["frame"][rows].tolist() == kept.tolist()
    assert torch.equal(held.data["image"][rows], torch.from_numpy(traj.images_chw()[kept]))
    assert held.data["label"][rows].tolist() == out.label[kept].astype(int).tolist()
    item = held[0]
    assert item["instruction"] == "put the bowl on the plate" and item["image"].dtype == torch.uint8


def test_libero_instruction_from_file_name():
    assert instruction_from_filename("/d/KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5") == "turn on the stove"
    assert instruction_from_filename("pick_up_the_black_bowl_demo.hdf5") == "pick up the black bowl"


def test_libero_reader(tmp_path):
    """Without h5py: one clear error. With it: a LIBERO-layout file reads back as trajectories."""
    from modules.vla_rl.libero_demos import read_libero_demos

    try:
        import h5py
    except ImportError:
        with pytest.raises(ImportError, match="pip install h5py"):
            next(read_libero_demos(str(tmp_path / "x.hdf5")))
        return
    import json

    path = tmp_path / "LIVING_ROOM_SCENE1_put_the_bowl_on_the_plate_demo.hdf5"
    traj = _trajectory()
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": "put the bowl on the plate"})
        for i in (1, 0):
            demo = data.create_group(f"demo_{i}")
            demo["obs/agentview_rgb"] = traj.images
            demo["obs/ee_pos"] = traj.ee_pos + i
            closed = (traj.gripper > 0).astype(float)
            demo["obs/gripper_states"] = np.stack([0.04 - 0.04 * closed, -0.04 + 0.04 * closed], -1)
            demo["actions"] = np.concatenate([np.zeros((T, 6)), traj.gripper[:, None]], -1)
            demo["dones"] = np.eye(1, T, T - 1, dtype=np.uint8)[0]
    out = list(read_libero_demos(str(path)))
    assert [t.episode.split("/")[-1] for t in out] == ["demo_0", "demo_1"]
    assert out[0].instruction == "put the bowl on the plate" and out[0].success
    assert np.array_equal(out[0].images, traj.images[:, ::-1, ::-1])  # flipped 180 degrees
    assert np.array_equal(out[1].ee_pos, traj.ee_pos + 1)
    assert PseudoLabeler().gripper_events(out[0].gripper).tolist() == [10, 25]
    state = next(read_libero_demos(str(path), gripper_source="state"))
    assert PseudoLabeler().gripper_events(state.gripper).tolist() == [10, 25]
    # the datamodule builds the dataset from the demos on first use (prepare_data)
    from datamodules.rprm_data import RPRMDataModule

    dm = RPRMDataModule(str(tmp_path / "built"), demos=[str(tmp_path / "*_demo.hdf5")],
                        labeler=PseudoLabeler(final_k=3), heldout_fraction=0.5)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == len(dm.val_set) == T and dm.train_set.instructions == [out[0].instruction]
    expected = PseudoLabeler(final_k=3)(out[0]).label
    assert dm.train_set.labels.tolist() == expected.astype(int).tolist()
    assert torch.equal(dm.train_set.data["image"], torch.from_numpy(out[0].images_chw()))
