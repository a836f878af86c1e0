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
build the kit pins, and it resizes by gathering spans, several times slower than the matrix
products below; its ``pil`` backend resizes before the JPEG round-trip and crops with PIL's
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
    """uint8 [..., 3, H, W] -> the same images JPEG-encoded at ``quality`` and decoded (PIL,
    default 4:2:0 subsampling). Planar all the way: the RGB image is merged from zero-copy "L"
    views of the CHW planes, and the decoded one is read out band by band (PIL's "R", "G", "B"
    raw packers) into the CHW output. The same bytes and pixels as going through
    ``Image.fromarray(image.permute(1, 2, 0).numpy())`` and ``np.asarray(...convert("RGB"))``
    without their interleaving copies (bench/openvla_image_parts.py times both)."""
    from PIL import Image

    flat = images.reshape(-1, *images.shape[-3:]).cpu().contiguous()
    h, w = flat.shape[-2:]
    out = torch.empty(flat.shape, dtype=torch.uint8)
    planes, out_planes = flat.numpy(), out.numpy()
    for i in range(flat.shape[0]):
        decoded = Image.open(io.BytesIO(jpeg_bytes(planes[i], quality)), formats=("JPEG",))
        if decoded.mode != "RGB":
            decoded = decoded.convert("RGB")
        for plane, band in zip(out_planes[i], "RGB"):
            plane[...] = np.frombuffer(decoded.tobytes("raw", band), dtype=np.uint8).reshape(h, w)
    return out.reshape(images.shape).to(images.device)


def jpeg_bytes(planes: np.ndarray, quality: int) -> bytes:
    """One contiguous uint8 [3, H, W] image -> its JPEG file (PIL, default 4:2:0 subsampling),
    encoded from zero-copy "L" views of the planes merged into an RGB image."""
    from PIL import Image

    h, w = planes.shape[-2:]
    buf = io.BytesIO()
    Image.merge("RGB", [Image.frombuffer("L", (w, h), plane, "raw", "L", 0, 1) for plane in planes]).save(
        buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float values in [0, 256) -> uint8, truncated (a C cast, as ``x.to(torch.uint8)``). On the
    CPU through numpy into a torch-owned tensor: numpy's cast is the cheaper one there
    (bench/openvla_image_parts.py)."""
    if x.device.type != "cpu":
        return x.to(torch.uint8)
    out = torch.empty(x.shape, dtype=torch.uint8)
    np.copyto(out.numpy(), x.numpy(), casting="unsafe")
    return out


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
    # a torch-owned copy: arithmetic on tensors that view numpy memory is slow (alignment)
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
    On the CPU in float32 through the banded blocks of the weight matrices (each output row
    reads ~7 input rows, so most of the dense ``W_h @ image @ W_w^T`` multiplies zeros;
    bench/libero_env_breakdown.py times both); on a GPU dense, in float64
    (where float32 matmuls may run in TF32). TF itself accumulates in float32, so either rounds
    differently from TF only where a value lies within ~1e-4 of .5 (~1e-5 of the pixels)."""
    if images.shape[-2:] == (size, size):
        return images
    return _to_uint8(_resize_rounded(images, size))


def _resize_rounded(images: torch.Tensor, size: int) -> torch.Tensor:
    """``lanczos3_resize`` before its uint8 cast: float (float32 on the CPU, float64 on a GPU)
    holding the rounded, clipped integers 0..255."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images.to(torch.float32)
    if images.device.type == "cpu":
        x = images.to(torch.float32)
        x = torch.cat([band @ x[..., a:b, :] for band, a, b in _bands_on(h, size, images.device)], -2)
        out = torch.cat([x[..., a:b] @ band.T for band, a, b in _bands_on(w, size, images.device)], -1)
    else:
        wh = _matrix_on(h, size, images.device, torch.float64)
        ww = _matrix_on(w, size, images.device, torch.float64)
        out = wh @ images.to(torch.float64) @ ww.T
    return out.round_().clamp_(0, 255)


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


def _runs(index: np.ndarray) -> tuple[tuple[int, int], ...]:
    """``index`` as runs of consecutive values: (start, stop) slices whose concatenation is it."""
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    return tuple((int(index[a]), int(index[a]) + int(b - a))
                 for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(index)]))


@functools.lru_cache(maxsize=16)
def _crop_on(h: int, w: int, device: torch.device):
    """The crop's plan for an [h, w] image: the span of input rows [r0, r1) any output reads,
    the top and bottom row of each output row (from r0) and their lerp weights [h, 1], the left
    and right columns of each output column as runs of slices (``_runs``) and their weights."""
    top, bottom, ylerp = crop_axis(h, h)
    left, right, xlerp = crop_axis(w, w)
    r0, r1 = int(top.min()), int(bottom.max()) + 1
    # torch-owned copies: arithmetic on tensors that view numpy memory is slow (alignment)
    tensors = [torch.from_numpy(a).to(device).clone() for a in (top - r0, bottom - r0, ylerp[:, None], xlerp)]
    return r0, r1, *tensors, _runs(left), _runs(right)


def center_crop(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, S, S] -> uint8 [..., C, S, S]: OpenVLA's ``crop_and_resize`` (the centred
    0.9-area box, bilinear, on x / 255 in float32; x-lerp then y-lerp as TF), clipped to [0, 1]
    and converted to uint8 by TF's rule (x 255.5, truncated)."""
    return _crop_rounded(images)


def _crop_rounded(images: torch.Tensor) -> torch.Tensor:
    """``center_crop`` of uint8 images or of float ones holding integers 0..255 (the resize's
    output before its uint8 cast). Separable, with TF's float32 operations in TF's order, so the
    same bits as lerping the four gathered corners of every output pixel (that per-pixel version
    is kept in bench/openvla_image_parts.py as the reference): x / 255 of the rows the crop
    reads; the x-lerp ``l + (r - l) * xlerp`` once per input row, its left and right columns cut
    as contiguous slices (12 runs for 224 px: cheaper than a ``gather`` or an ``index_select``
    along the last dim); then the top and bottom rows picked and y-lerped."""
    h, w = images.shape[-2:]
    r0, r1, top, bottom, ylerp, xlerp, left, right = _crop_on(h, w, images.device)
    rows = images[..., r0:r1, :]
    scale = torch.tensor(1.0 / 255.0, dtype=torch.float32, device=images.device)
    if rows.dtype == torch.float32:
        x = torch.mul(rows, scale)  # a new tensor: the caller's stays as it was
    else:
        x = rows.to(torch.float32).mul_(scale)
    lo = torch.cat([x[..., a:b] for a, b in left], -1)
    xl = torch.cat([x[..., a:b] for a, b in right], -1).sub_(lo).mul_(xlerp).add_(lo)  # l + (r - l) * xlerp
    t = xl.index_select(-2, top)
    out = xl.index_select(-2, bottom).sub_(t).mul_(ylerp).add_(t)  # t + (b - t) * ylerp
    # in [0, 255.5] after the first clip: TF's second clip to 255 changes nothing the cast keeps
    return _to_uint8(out.clamp_(0.0, 1.0).mul_(255.5))


def resize_and_crop(images: torch.Tensor, size: int, crop: bool = True) -> torch.Tensor:
    """The pipeline's second half (after the JPEG round-trip): Lanczos3 resize, centre crop;
    the resize hands the crop its rounded floats (no uint8 round-trip in between)."""
    if not crop:
        return lanczos3_resize(images, size)
    return _crop_rounded(_resize_rounded(images, size))


def openvla_image(images: torch.Tensor, size: int = 224, jpeg_quality: int | None = 95,
                  crop: bool = True) -> torch.Tensor:
    """The whole pipeline on flipped renders: JPEG round-trip, Lanczos3 resize, centre crop."""
    if jpeg_quality is not None:
        images = jpeg_roundtrip(images, jpeg_quality)
    return resize_and_crop(images, size, crop)
