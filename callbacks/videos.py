"""Evaluation videos: the first episodes of an evaluation as MP4 files and TensorBoard animations.

``EpisodeRecorder`` keeps the observation frames of the first ``count`` envs of a batched
evaluation until each one's first episode ends (what the policy saw: for LIBERO the
OpenVLA-processed 224 px view, for BabyAI the egocentric view). ``write_mp4`` encodes with
OpenCV (``opencv-python-headless``, a base dependency); ``add_tensorboard_video`` writes an
animated GIF image summary, which is what ``SummaryWriter.add_video`` does, without needing
moviepy (encoded here with Pillow).
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch


class EpisodeRecorder:
    def __init__(self, count: int, key=("observation", "image")):
        self.count, self.key = count, key
        self._frames: list[list[np.ndarray]] = [[] for _ in range(count)]

    def add(self, td, alive: torch.Tensor) -> None:
        """Record the current observation of envs ``i < count`` whose first episode is running."""
        images = td.get(self.key)[: self.count]
        for i in range(min(self.count, images.shape[0])):
            if bool(alive[i]):
                self._frames[i].append(to_hwc_uint8(images[i]))

    def episodes(self) -> list[np.ndarray]:
        """One ``[T, H, W, 3]`` uint8 array per recorded env (empty envs dropped)."""
        return [np.stack(f) for f in self._frames if f]


def to_hwc_uint8(image: torch.Tensor) -> np.ndarray:
    """A ``[3, H, W]`` (uint8, or float in [0, 1]) image as an ``[H, W, 3]`` uint8 array."""
    x = image.detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy().copy()


def write_mp4(path: str, frames: np.ndarray, fps: int = 10) -> str:
    """Encode ``[T, H, W, 3]`` RGB uint8 frames as an MP4 (mp4v) at ``path``; written to a
    temporary name first, so a crash never leaves a truncated video under the final name."""
    import cv2

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4: frames must be [T, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".part.mp4"
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"write_mp4: OpenCV cannot open a mp4v writer for {path!r}")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    os.replace(tmp, path)
    return path


def add_tensorboard_video(experiment, tag: str, frames: np.ndarray, step: int, fps: int = 10) -> None:
    """An animated GIF image summary (TensorBoard's Images tab plays it)."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    buf = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    h, w = frames.shape[1:3]
    image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
    experiment.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
