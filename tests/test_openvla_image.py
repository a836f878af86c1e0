"""OpenVLA's LIBERO image pipeline (datamodules/openvla_image.py) against torchrl's
TensorFlow-compatible reference (``torchrl.data.vla.preprocessing``: Lanczos3 spans gathered
per output pixel, TF's CropAndResize), and the split between env workers and the main process."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.data.vla.preprocessing import _fractional_center_crop, _lanczos3_resize

from datamodules.libero import OpenVLAObservation, libero_options
from datamodules.openvla_image import (_to_uint8, center_crop, crop_axis, jpeg_roundtrip, lanczos3_matrix,
                                       lanczos3_resize, openvla_image, resize_and_crop)


def scene_like(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, size, size]: smooth gradients, hard edges and noise (like a render)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([255 * xx, 255 * yy, 128 + 100 * torch.sin(12 * xx + 7 * yy)])
    base = base.expand(n, -1, -1, -1).clone()
    base[:, :, size // 4: size // 2, size // 3: size // 2] = 250.0  # a bright box: ringing at its edges
    base += 20 * torch.randn(base.shape, generator=g)
    return base.clamp(0, 255).to(torch.uint8)


def torchrl_reference(images: torch.Tensor, size: int) -> torch.Tensor:
    out = _lanczos3_resize(images.to(torch.float32), (size, size)).round_().clamp_(0, 255).to(torch.uint8)
    return out


def differing(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    d = (a.int() - b.int()).abs()
    return int(d.max()), float((d > 0).float().mean())


@pytest.mark.parametrize("src,dst", [(256, 224), (128, 64), (64, 32), (128, 224)])
def test_lanczos3_resize_matches_torchrl_tf_reference(src, dst):
    images = scene_like(3, src)
    ours, ref = lanczos3_resize(images, dst), torchrl_reference(images, dst)
    assert ours.shape == ref.shape == (3, 3, dst, dst) and ours.dtype == torch.uint8
    worst, frac = differing(ours, ref)
    # float64 matrices vs float32 gathered spans: only values within ~1e-4 of .5 can round apart
    assert worst <= 1 and frac < 1e-3, (worst, frac)


def test_lanczos3_weights():
    w = lanczos3_matrix(256, 224)
    assert w.shape == (224, 256)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    # antialiased downsampling: the kernel (radius 3) is widened by 256/224 to 6.9 input pixels,
    # so most outputs read 7 inputs (an unwidened Lanczos3 reads at most 6)
    taps = (w != 0).sum(1)
    assert (taps[3:-3] >= 6).all() and (taps == 7).mean() > 0.5
    # mirror symmetry of the resampling grid
    np.testing.assert_allclose(w, w[::-1, ::-1], atol=5e-5)  # float32, as TF
    # a constant image stays exactly constant; a same-size resize is the identity (as TF's shortcut)
    flat = torch.full((1, 3, 256, 256), 77, dtype=torch.uint8)
    assert (lanczos3_resize(flat, 224) == 77).all()
    img = scene_like(1, 64)
    assert torch.equal(lanczos3_resize(img, 64), img)


def test_center_crop_matches_torchrl_tf_reference():
    images = scene_like(4, 224, seed=1)
    ours, ref = center_crop(images), _fractional_center_crop(images, (224, 224))
    worst, frac = differing(ours, ref)
    assert worst <= 1 and frac < 1e-3, (worst, frac)
    # it is a zoom: the centre pixel stays, the border comes from ~2.6% inside the frame
    big = torch.zeros(1, 3, 224, 224, dtype=torch.uint8)
    big[..., :5, :] = 255  # a bright top band of 5 rows: mostly cropped away
    assert center_crop(big)[..., 0, :].float().mean() < 255 and center_crop(big)[..., 10:, :].max() == 0


def four_corner_crop(images: torch.Tensor) -> np.ndarray:
    """TF's CropAndResize written out per output pixel (numpy float32, one operation at a time):
    the four corners x / 255, x-lerp of the top and bottom pair, y-lerp, clip, x 255.5, clip,
    truncate. The layout ``center_crop`` computes separably must give these bits."""
    f = np.float32
    x = images.numpy().astype(f) * f(1.0 / 255.0)
    top, bottom, ylerp = crop_axis(*(images.shape[-2],) * 2)
    left, right, xlerp = crop_axis(*(images.shape[-1],) * 2)
    tl, tr = x[..., top[:, None], left], x[..., top[:, None], right]
    bl, br = x[..., bottom[:, None], left], x[..., bottom[:, None], right]
    t = tl + (tr - tl) * xlerp
    b = bl + (br - bl) * xlerp
    out = t + (b - t) * ylerp[:, None]
    return (np.clip(np.clip(out, f(0), f(1)) * f(255.5), f(0), f(255))).astype(np.uint8)


@pytest.mark.parametrize("shape", [(3, 224, 224), (2, 3, 224, 224), (2, 2, 3, 64, 64), (1, 37, 53)])
def test_center_crop_is_bit_identical_to_the_four_corner_formula(shape):
    g = torch.Generator().manual_seed(sum(shape))
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    ref = torch.from_numpy(four_corner_crop(images))
    assert torch.equal(center_crop(images), ref)
    if shape[-2:] == (224, 224):  # render-like too, and the float hand-off from the resize
        images = scene_like(2, 224, seed=5)
        assert torch.equal(center_crop(images), torch.from_numpy(four_corner_crop(images)))
        assert torch.equal(resize_and_crop(images, 224), center_crop(images))  # same size: no resize
        frames = scene_like(2, 256, seed=6)
        assert torch.equal(resize_and_crop(frames, 224), center_crop(lanczos3_resize(frames, 224)))


def pil_jpeg_roundtrip(image: torch.Tensor, quality: int) -> tuple[bytes, torch.Tensor]:
    """One CHW image through PIL the plain way: HWC array in, bytes, decoded RGB CHW out."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(buf, format="JPEG", quality=quality)
    data = buf.getvalue()
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return data, torch.from_numpy(decoded.transpose(2, 0, 1).copy())


def test_jpeg_roundtrip_is_bit_identical_to_plain_pil():
    g = torch.Generator().manual_seed(7)
    noise = torch.randint(0, 256, (2, 2, 3, 48, 40), dtype=torch.uint8, generator=g)
    scene = scene_like(2, 64, seed=7)
    for images in (noise, scene, scene.transpose(-1, -2), scene[0]):  # batches, a non-contiguous view, one image
        got = jpeg_roundtrip(images, 95)
        assert got.shape == images.shape and got.dtype == torch.uint8
        flat = images.reshape(-1, *images.shape[-3:])
        expected = torch.stack([pil_jpeg_roundtrip(image, 95)[1] for image in flat]).reshape(images.shape)
        assert torch.equal(got, expected)
        assert not torch.equal(got, images)  # it did compress
    # lower quality: still the same pixels as plain PIL
    assert torch.equal(jpeg_roundtrip(scene[0], 50), pil_jpeg_roundtrip(scene[0], 50)[1])


def test_fast_uint8_cast_truncates_as_torch():
    values = torch.arange(0, 256 * 1024, dtype=torch.float32) / 1024  # [0, 256) in steps of 1/1024
    values = torch.cat([values, torch.nextafter(torch.arange(1, 256, dtype=torch.float32), torch.tensor(0.0)),
                        torch.tensor([255.5, 255.9999, 0.0])])
    assert torch.equal(_to_uint8(values), values.to(torch.uint8))
    assert torch.equal(_to_uint8(values.reshape(-1, 2).T), values.reshape(-1, 2).T.to(torch.uint8))  # strided


def test_jpeg_comes_before_the_resize():
    """OpenVLA JPEG-encodes the 256 px render, then resizes (torchrl's pil backend does the
    opposite): the pipeline equals that order and measurably differs from the other."""
    images = scene_like(2, 256, seed=2)
    got = openvla_image(images, 224, 95, True)
    expected = center_crop(lanczos3_resize(jpeg_roundtrip(images, 95), 224))
    assert torch.equal(got, expected)
    other = center_crop(jpeg_roundtrip(lanczos3_resize(images, 224), 95))
    assert (got.float() - other.float()).abs().mean() > 0.5


def test_split_between_workers_and_main_process_is_the_same_image():
    """``image_device``: workers JPEG, the main process resizes and crops a batch: same pixels."""
    frames = scene_like(3, 256, seed=3)
    td = TensorDict({("observation", "image"): frames}, batch_size=[3])
    whole = OpenVLAObservation(224, 95, True)(td.clone())["observation", "image"]
    jpeg = OpenVLAObservation(224, 95, True, stages=("jpeg",))(td.clone())
    assert jpeg["observation", "image"].shape[-1] == 256
    split = OpenVLAObservation(224, 95, True, stages=("resize",), device="cpu")(jpeg)["observation", "image"]
    assert torch.equal(whole, split)


def test_image_device_bad_value_is_one_clear_line():
    with pytest.raises(ValueError, match=r"data.stream\[0\].image_device='gpu0': not a torch device"):
        libero_options({"image_device": "gpu0"}, "data.stream[0]")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"image_device='cuda': no CUDA device"):
            libero_options({"image_device": "cuda"}, "data.stream[0]")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_equals_cpu():
    images = jpeg_roundtrip(scene_like(16, 256, seed=4), 95)
    cpu = center_crop(lanczos3_resize(images, 224))
    gpu = center_crop(lanczos3_resize(images.cuda(), 224)).cpu()
    worst, frac = differing(cpu, gpu)
    assert worst <= 1 and frac < 1e-4, (worst, frac)
