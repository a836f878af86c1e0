"""Evaluation videos: MP4 round trip, TensorBoard GIF summaries, the episode recorder."""
import glob
import io

import numpy as np
import torch
from PIL import Image
from helpers.videos import read_mp4
from tensordict import TensorDict

from callbacks.videos import EpisodeRecorder, add_tensorboard_video, to_hwc_uint8, write_mp4


def _ramp(T=12, h=48, w=64):
    # flat colour per frame: red rises, blue falls (mp4v is lossy, flat regions survive well)
    frames = np.zeros((T, h, w, 3), np.uint8)
    for t in range(T):
        frames[t, ..., 0] = 20 * t
        frames[t, ..., 2] = 255 - 20 * t
    return frames


def test_mp4_round_trip(tmp_path):
    frames = _ramp()
    path = write_mp4(str(tmp_path / "v" / "a.mp4"), frames, fps=5)
    back = read_mp4(path)
    assert len(back) == 12 and back[0].shape == (48, 64, 3)
    for t in (0, 6, 11):
        assert abs(float(back[t][..., 0].mean()) - 20 * t) < 6
        assert abs(float(back[t][..., 2].mean()) - (255 - 20 * t)) < 6
    assert not glob.glob(str(tmp_path / "v" / "*.part.mp4"))


def test_tensorboard_gif_summary(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    add_tensorboard_video(w, "eval_video/task0_ep0/before", _ramp(T=7), step=3, fps=5)
    w.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    (img,) = acc.Images("eval_video/task0_ep0/before")
    assert (img.step, img.width, img.height) == (3, 64, 48)
    gif = Image.open(io.BytesIO(img.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 7
    gif.seek(6)
    assert abs(int(np.asarray(gif.convert("RGB"))[0, 0, 0]) - 120) <= 4


def test_recorder_keeps_each_env_until_its_first_episode_ends():
    rec = EpisodeRecorder(count=2)
    alive = torch.ones(3, dtype=torch.bool)
    for t in range(5):
        img = torch.full((3, 3, 4, 4), t, dtype=torch.uint8)
        rec.add(TensorDict({"observation": {"image": img}}, batch_size=[3]), alive.clone())
        if t == 1:
            alive[0] = False  # env 0's episode ended after two frames
    lengths = [len(e) for e in rec.episodes()]
    assert lengths == [2, 5]
    assert rec.episodes()[1][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_float_images_are_scaled():
    x = torch.zeros(3, 2, 2)
    x[1] = 0.5
    out = to_hwc_uint8(x)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8 and out[0, 0].tolist() == [0, 128, 0]
