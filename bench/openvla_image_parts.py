"""The OpenVLA image pipeline's parts (datamodules/openvla_image.py) vs straightforward versions, in one process.

The ``old_*`` functions are the straightforward implementations, kept as the baseline: the
JPEG round-trip through ``Image.fromarray`` of a permuted view and ``.convert("RGB")``, the
resize's torch uint8 cast, the crop from four corners per output pixel gathered in one
``torch.gather``. Each part is timed on a render-like frame (gradients, a bright box, mild noise);
each rep runs every old and new function once, in turn, so drift hits all alike; median ms,
new/old ratio. Before timing, every new output is
checked equal (``torch.equal``; the JPEG bytes too) to the old one on random images, a smooth
gradient and the render-like frame. "PIL encode + decode" is the floor of the JPEG part: PIL's own
save and open + load of a prepared RGB image, no tensor conversion.

Usage: python bench/openvla_image_parts.py [--reps 50 --size 256 --batch 1 --out 224 --threads 1]
"""
import argparse
import io
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules.openvla_image import (_resize_rounded, _to_uint8, center_crop, crop_axis,  # noqa: E402
                                       jpeg_bytes, jpeg_roundtrip, lanczos3_resize, openvla_image,
                                       resize_and_crop)


# ---- the baseline: straightforward implementations of the same functions ----

def old_jpeg_roundtrip(images: torch.Tensor, quality: int) -> torch.Tensor:
    flat = images.reshape(-1, *images.shape[-3:]).cpu()
    out = []
    for image in flat:
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out.append(torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(out).reshape(images.shape).to(images.device)


def old_lanczos3_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """The baseline resize: the same banded float32 products (the kit's ``_resize_rounded``), then
    torch's float -> uint8 cast (the kit's uses numpy's, ``_to_uint8``)."""
    if images.shape[-2:] == (size, size):
        return images
    return _resize_rounded(images, size).to(torch.uint8)


_old_crop_cache = {}


def old_crop_on(c, h, w, device):
    key = (c, h, w, device)
    if key not in _old_crop_cache:
        top, bottom, ylerp = crop_axis(h, h)
        left, right, xlerp = crop_axis(w, w)
        corners = np.stack([(r[:, None] * w + x[None, :]).ravel() for r in (top, bottom) for x in (left, right)])
        index = (np.arange(c)[:, None, None] * h * w + corners[None]).ravel()
        _old_crop_cache[key] = tuple(torch.from_numpy(a).to(device).clone() for a in (index, ylerp, xlerp))
    return _old_crop_cache[key]


def old_center_crop(images: torch.Tensor) -> torch.Tensor:
    c, h, w = images.shape[-3:]
    index, ylerp, xlerp = old_crop_on(c, h, w, images.device)
    flat = images.reshape(-1, c * h * w)
    corners = torch.gather(flat, 1, index.expand(flat.shape[0], -1)).reshape(*images.shape[:-3], c, 4, h, w)
    corners = corners.to(torch.float32) * torch.tensor(1.0 / 255.0, dtype=torch.float32, device=images.device)
    tl, tr, bl, br = corners.unbind(-3)
    t = tl + (tr - tl) * xlerp
    b = bl + (br - bl) * xlerp
    out = t + (b - t) * ylerp[:, None]
    return (out.clamp_(0.0, 1.0) * 255.5).clamp_(0, 255).to(torch.uint8)


def old_resize_and_crop(images, size, crop=True):
    images = old_lanczos3_resize(images, size)
    return old_center_crop(images) if crop else images


def old_openvla_image(images, size=224, jpeg_quality=95, crop=True):
    if jpeg_quality is not None:
        images = old_jpeg_roundtrip(images, jpeg_quality)
    return old_resize_and_crop(images, size, crop)


# ---- inputs ----

def render_like(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [batch, 3, size, size]: gradients, a bright box, a sine pattern, mild noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([255 * xx, 255 * yy, 128 + 100 * torch.sin(12 * xx + 7 * yy)]).expand(batch, -1, -1, -1).clone()
    base[:, :, size // 4: size // 2, size // 3: size // 2] = 250.0
    base += 4 * torch.randn(base.shape, generator=g)
    return base.clamp(0, 255).to(torch.uint8)


def gradient(batch: int, size: int) -> torch.Tensor:
    """uint8 [batch, 3, size, size]: smooth ramps, no noise."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ramp = torch.stack([xx * 255 // (size - 1), yy * 255 // (size - 1), (xx + yy) * 255 // (2 * size - 2)])
    return ramp.to(torch.uint8).expand(batch, -1, -1, -1).contiguous()


def jpeg_bytes_old(image: torch.Tensor, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def check(name, old, new, inputs):
    for x in inputs:
        a, b = old(x), new(x)
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: new output differs from old on {tuple(x.shape)}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--size", type=int, default=256, help="input frame size (px)")
    p.add_argument("--batch", type=int, default=1, help="frames per call; 1 times a single [3, S, S] frame")
    p.add_argument("--out", type=int, default=224, help="output size (px)")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--threads", type=int, default=1, help="torch threads (env workers run with 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    q, s, o = args.quality, args.size, args.out
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__} ({args.threads} thread(s)), "
          f"numpy {np.__version__}, Pillow {PIL.__version__}")

    # ---- equality: new == old, bit for bit ----
    g = torch.Generator().manual_seed(1)
    frames = [torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8, generator=g) for _ in range(3)]
    frames += [gradient(2, s), render_like(2, s, seed=2),
               torch.randint(0, 256, (3, s, s), dtype=torch.uint8, generator=g)]
    for x in frames:
        for image in x.reshape(-1, 3, s, s):
            assert jpeg_bytes_old(image, q) == jpeg_bytes(image.contiguous().numpy(), q), "JPEG bytes differ"
    check("jpeg_roundtrip", lambda x: old_jpeg_roundtrip(x, q), lambda x: jpeg_roundtrip(x, q), frames)
    check("lanczos3_resize", lambda x: old_lanczos3_resize(x, o), lambda x: lanczos3_resize(x, o), frames)
    crops = [old_lanczos3_resize(x, o) for x in frames]
    crops.append(torch.randint(0, 256, (4, 3, o, o), dtype=torch.uint8, generator=g))
    check("center_crop", old_center_crop, center_crop, crops)
    check("resize_and_crop", lambda x: old_resize_and_crop(x, o), lambda x: resize_and_crop(x, o), frames)
    check("openvla_image", lambda x: old_openvla_image(x, o, q), lambda x: openvla_image(x, o, q), frames)
    dense = torch.arange(0, 256 * 4096, dtype=torch.float32) / 4096  # every 1/4096 step in [0, 256)
    assert torch.equal(_to_uint8(dense), dense.to(torch.uint8))
    print(f"equal to the old implementations: {len(frames)} input sets (random, gradient, render-like), "
          "JPEG bytes, every part and the whole pipeline")

    # ---- timing ----
    frame = render_like(args.batch, s)
    if args.batch == 1:
        frame = frame[0].clone()
    jpeg = jpeg_roundtrip(frame, q)
    resized = lanczos3_resize(jpeg, o)
    pil_images = [Image.fromarray(np.ascontiguousarray(f.permute(1, 2, 0).numpy())) for f in frame.reshape(-1, 3, s, s)]

    def pil_floor():  # PIL's own encode + decode, prepared RGB image in, loaded image out
        for im in pil_images:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=q)
            buf.seek(0)
            Image.open(buf).load()

    def float_to_uint8_old():
        return scaled.to(torch.uint8)

    def float_to_uint8_new():
        return _to_uint8(scaled)

    scaled = resized.to(torch.float32) * 1.01
    parts = [
        ("JPEG round-trip", lambda: old_jpeg_roundtrip(frame, q), lambda: jpeg_roundtrip(frame, q)),
        ("  PIL encode + decode (floor)", None, pil_floor),
        ("Lanczos3 resize", lambda: old_lanczos3_resize(jpeg, o), lambda: lanczos3_resize(jpeg, o)),
        ("  float -> uint8 cast", float_to_uint8_old, float_to_uint8_new),
        ("centre crop", lambda: old_center_crop(resized), lambda: center_crop(resized)),
        ("resize + crop", lambda: old_resize_and_crop(jpeg, o), lambda: resize_and_crop(jpeg, o)),
        ("whole pipeline", lambda: old_openvla_image(frame, o, q), lambda: openvla_image(frame, o, q)),
    ]
    print(f"\nmedian ms per call over {args.reps} reps, input uint8 {tuple(frame.shape)} -> {o} px; "
          "each rep runs every function once, in turn")
    fns = [fn for _, old, new in parts for fn in (old, new) if fn is not None]
    times = {fn: [] for fn in fns}
    for fn in fns:
        fn()  # warm-up (caches, allocator)
    for _ in range(args.reps):
        for fn in fns:
            t0 = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t0)
    ms = {fn: statistics.median(times[fn]) * 1e3 for fn in fns}
    print(f"{'part':32s} {'old ms':>8s} {'new ms':>8s} {'new/old':>8s}")
    for name, old, new in parts:
        if old is None:
            print(f"{name:32s} {'':>8s} {ms[new]:8.3f}")
        else:
            print(f"{name:32s} {ms[old]:8.3f} {ms[new]:8.3f} {ms[new] / ms[old]:8.2f}")

if __name__ == "__main__":
    main()
