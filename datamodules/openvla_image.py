"""OpenVLA's LIBERO image pipeline, computed as its evaluation code computes it.

openvla ``experiments/robot``: ``get_libero_image`` flips the 256x256 agentview render 180
degrees (torchrl's ``LiberoEnv`` does that); ``resize_image`` JPEG-encodes and decodes it
(``tf.image.encode_jpeg``, quality 95, "as done in the RLDS dataset builder"), resizes it with
``tf.image.resize(method="lanczos3", antialias=True)`` and rounds to uint8; ``get_vla_action``
(``center_crop=True``, models trained with random-crop augmentation) converts to float
(x / 255), takes the centred box of 0.9 of the area with ``tf.image.crop_and_resize``
(bilinear) back to 224x224, and converts to uint8 as TF does (x 255.5, truncated).

Why not torchrl's ``OpenVLAImagePreprocessor``: its ``torch_reference`` backend computes this
pipeline but needs torchvision (for the JPEG codec), which does not import beside the CPU torch
build the kit pins (ENVIRONMENT.md), and it resizes by gathering spans (12 ms per 256 px image
on one core of the 2-core machine, ad-hoc timing); its ``pil`` backend resizes before the JPEG round-trip and crops with PIL's
Lanczos, which is not what OpenVLA saw. Here: the JPEG round-trip with PIL (libjpeg), TF's
Lanczos3 weights as two small matrices (``W_h @ image @ W_w^T``; on the CPU in banded blocks,
bench/libero_env_breakdown.py; one batched call on a GPU for all envs), TF's crop in float32. Checked
against torchrl's TF-compatible reference in tests/test_openvla_image.py. Not checked against
TensorFlow itself (not installed on these machines): TF's JPEG decoder uses a "system-specific"
IDCT (possibly libjpeg's fast integer one), PIL the accurate one, which can move some pixels by
a grey level or two.
"""
from __future__ import annotations

import functools
import io

import numpy as np
import torch

LANCZOS_RADIUS = 3.0
CROP_AREA = 0.9  # OpenVLA's crop_scale


def jpeg_roundtrip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> the same images JPEG-encoded at ``quality`` and decoded (PIL)."""
    from PIL import Image

    flat = images.reshape(-1, *images.shape[-3:]).cpu()
    out = []
    for image in flat:
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out.append(torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(out).reshape(images.shape).to(images.device)


@functools.lru_cache(maxsize=16)
def lanczos3_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of TF's ScaleAndTranslate with the Lanczos3 kernel,
    antialiased, no translation (tf.image.resize's "lanczos3"), computed in float32 as TF does:
    output x samples the input at (x + 0.5) / scale; when downsampling the kernel is widened by
    1 / scale; each row's weights are normalised to sum to 1."""
    f = np.float32
    inv_scale = f(1.0) / (f(out_size) / f(in_size))
    kernel_scale = max(inv_scale, f(1.0))
    radius = f(LANCZOS_RADIUS)
    w = np.zeros((out_size, in_size), dtype=np.float32)
    for x in range(out_size):
        sample = (f(x) + f(0.5)) * inv_scale
        start = min(max(int(np.ceil(sample - radius * kernel_scale - f(0.5))), 0), in_size - 1)
        end = min(max(int(np.floor(sample + radius * kernel_scale - f(0.5))), 0), in_size - 1) + 1
        t = np.abs((np.arange(start, end, dtype=f) + f(0.5) - sample) * (f(1.0) / kernel_scale))
        safe = np.where(t <= f(1e-3), f(1.0), t)
        pi = f(3.14159265359)
        k = radius * np.sin(pi * safe) * np.sin(pi * safe / radius) / (pi * pi * safe * safe)
        k = np.where(t <= f(1e-3), f(1.0), np.where(t > radius, f(0.0), k)).astype(f)
        total = k.sum(dtype=f)
        w[x, start:end] = k * (f(1.0) / total) if abs(total) >= 1000 * np.finfo(f).tiny else k
    return w


@functools.lru_cache(maxsize=16)
def _matrix_on(in_size: int, out_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # a torch-owned copy: arithmetic with tensors viewing numpy memory ran ~10x slower here (alignment)
    return torch.from_numpy(lanczos3_matrix(in_size, out_size)).to(device, dtype).clone()


BAND_BLOCK = 32  # output rows per block of the banded CPU resize


@functools.lru_cache(maxsize=16)
def _bands_on(in_size: int, out_size: int, device: torch.device) -> tuple[tuple[torch.Tensor, int, int], ...]:
    """The Lanczos3 matrix cut into blocks of ``BAND_BLOCK`` output rows, each with only the
    input columns its kernels reach: (weights [rows, end - start], start, end). A 256 -> 224
    kernel spans 7 inputs, so the blocks skip ~85% of the dense matrix's zeros."""
    w = lanczos3_matrix(in_size, out_size)
    bands = []
    for row in range(0, out_size, BAND_BLOCK):
        block = w[row:row + BAND_BLOCK]
        used = np.flatnonzero(block.any(0))
        start, end = int(used[0]), int(used[-1]) + 1
        # torch-owned copies (see _matrix_on)
        bands.append((torch.from_numpy(block[:, start:end]).to(device).clone(), start, end))
    return tuple(bands)


def lanczos3_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> uint8 [..., 3, size, size]: tf.image.resize(lanczos3, antialias)
    then round half to even and clip, as OpenVLA's ``resize_image``. Any device, any batch.
    On the CPU in float32 through the banded blocks of the weight matrices (2.3x faster than the
    dense ``W_h @ image @ W_w^T`` on the H200 machine's CPU, 2.9x on the 2-core machine:
    bench/libero_env_breakdown.py, docs/benchmarks.md); on a GPU dense, in float64
    (where float32 matmuls may run in TF32). TF itself accumulates in float32, so either rounds
    differently from TF only where a value lies within ~1e-4 of .5 (~1e-5 of the pixels)."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if images.device.type == "cpu":
        x = images.to(torch.float32)
        x = torch.cat([band @ x[..., a:b, :] for band, a, b in _bands_on(h, size, images.device)], -2)
        out = torch.cat([x[..., a:b] @ band.T for band, a, b in _bands_on(w, size, images.device)], -1)
    else:
        wh = _matrix_on(h, size, images.device, torch.float64)
        ww = _matrix_on(w, size, images.device, torch.float64)
        out = wh @ images.to(torch.float64) @ ww.T
    return out.round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=16)
def crop_axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis of tf.image.crop_and_resize for OpenVLA's centred box (offset (1 - sqrt(0.9)) / 2,
    length sqrt(0.9), in float32): the lower and upper source index and the lerp weight of each
    output coordinate."""
    f = np.float32
    length = np.sqrt(f(CROP_AREA))
    lo = (f(1.0) - length) / f(2.0)
    hi = lo + length
    scale = (hi - lo) * f(in_size - 1) / f(out_size - 1)
    coords = lo * f(in_size - 1) + np.arange(out_size, dtype=f) * scale
    lower = np.floor(coords).astype(np.int64)
    upper = np.ceil(coords).astype(np.int64)
    return lower, upper, (coords - lower.astype(f)).astype(f)


@functools.lru_cache(maxsize=16)
def _crop_on(c: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat source indices into a [c, h, w] image of the four corners (top-left, top-right,
    bottom-left, bottom-right) of every output pixel, [c * 4 * h * w], and the lerp weights of
    the rows and columns."""
    top, bottom, ylerp = crop_axis(h, h)
    left, right, xlerp = crop_axis(w, w)
    corners = np.stack([(r[:, None] * w + x[None, :]).ravel() for r in (top, bottom) for x in (left, right)])
    index = (np.arange(c)[:, None, None] * h * w + corners[None]).ravel()
    # torch-owned copies: arithmetic with tensors viewing numpy memory ran ~10x slower here (alignment)
    return tuple(torch.from_numpy(a).to(device).clone() for a in (index, ylerp, xlerp))


def center_crop(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, S, S] -> uint8 [..., C, S, S]: OpenVLA's ``crop_and_resize`` (the centred
    0.9-area box, bilinear, on x / 255 in float32; x-lerp then y-lerp as TF), clipped to [0, 1]
    and converted to uint8 by TF's rule (x 255.5, truncated). The four corner pixels of every
    output are gathered from the uint8 image in one ``torch.gather`` before the float conversion
    (``index_select`` along the last dim took ~9 ms per image here; gather 0.3 ms)."""
    c, h, w = images.shape[-3:]
    index, ylerp, xlerp = _crop_on(c, h, w, images.device)
    flat = images.reshape(-1, c * h * w)
    corners = torch.gather(flat, 1, index.expand(flat.shape[0], -1)).reshape(*images.shape[:-3], c, 4, h, w)
    corners = corners.to(torch.float32) * torch.tensor(1.0 / 255.0, dtype=torch.float32, device=images.device)
    tl, tr, bl, br = corners.unbind(-3)
    t = tl + (tr - tl) * xlerp
    b = bl + (br - bl) * xlerp
    out = t + (b - t) * ylerp[:, None]
    return (out.clamp_(0.0, 1.0) * 255.5).clamp_(0, 255).to(torch.uint8)


def resize_and_crop(images: torch.Tensor, size: int, crop: bool = True) -> torch.Tensor:
    """The pipeline's second half (after the JPEG round-trip): Lanczos3 resize, centre crop."""
    images = lanczos3_resize(images, size)
    return center_crop(images) if crop else images


def openvla_image(images: torch.Tensor, size: int = 224, jpeg_quality: int | None = 95,
                  crop: bool = True) -> torch.Tensor:
    """The whole pipeline on flipped renders: JPEG round-trip, Lanczos3 resize, centre crop."""
    if jpeg_quality is not None:
        images = jpeg_roundtrip(images, jpeg_quality)
    return resize_and_crop(images, size, crop)
