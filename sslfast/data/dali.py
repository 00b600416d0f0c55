"""The DALI backend (optional extra `sslfast[dali]`: nvidia-dali-cuda130, or -cuda120 on CUDA 12).

One DALI pipeline per loader. Its input is an `external_source` fed by sslfast's own sampler — encoded file
bytes (decoded by `fn.decoders.image`, device "mixed" on a GPU, "cpu" otherwise) or decoded uint8 [H, W, 3]
arrays — so sharding, shuffling, drop-last and the per-epoch reset are the loader's plain Python logic, not
DALI reader state (the source of solo-learn's skipped-epoch and drop-last bugs).

Each view is a branch of the graph, with per-sample random parameters from DALI's seeded random operators:

    random_resized_crop(size, random_area=scale, random_aspect_ratio=ratio, 10 attempts, linear, antialiased
                        when downscaling, as the native kernel and torchvision v2)
    jitter (coin p): x = clamp(b·x); x = clamp(c·x + (1 − c)·mean(gray(x)));
                     x = clamp(fn.hsv(x, saturation=s, hue=360·h))
    grayscale (coin p): x = gray(x) on all channels            gray = .2989 r + .587 g + .114 b (arithmetic)
    blur (coin p): fn.gaussian_blur(window_size=k, sigma ~ U(σ range)) selected per sample
    solarize (coin p): x + 1{x ≥ t}·(255 − 2x)                   pixel arithmetic
    crop_mirror_normalize(mirror = coin(flip p), ImageNet mean/std, CHW, fp32)

Deviations from the native kernel (and torchvision): the jitter runs in the fixed order brightness →
contrast → saturation → hue (no per-sample permutation in a static graph), and DALI's hue is a rotation in
YIQ space rather than torchvision's HSV shift (its saturation is the same blend with the luma).

A corrupt image makes DALI invalidate the whole pipeline. Guard: files are checked before they are fed
(`datasets.looks_like_image`); if DALI still fails on a batch, every image of that batch is decoded with
PIL (or, when PIL decodes them all, run through DALI one by one), the bad ones are skipped and counted, the
pipeline is rebuilt and the batch is run again.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from . import datasets as D
from .native import read_image_bytes

_INSTALL_HINT = (
    "backend='dali' needs NVIDIA DALI: pip install 'sslfast[dali]' (nvidia-dali-cuda130), or "
    "nvidia-dali-cuda120 on CUDA 12"
)


def dali_modules():
    """(dali.fn, dali.types, dali.math, Pipeline), or ImportError with the install hint."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
        from nvidia.dali.pipeline import Pipeline
    except Exception as err:
        raise ImportError(f"{_INSTALL_HINT} ({type(err).__name__}: {err})") from err
    return fn, types, dmath, Pipeline


def dali_available() -> bool:
    try:
        dali_modules()
    except ImportError:
        return False
    return True


def _gray(x):
    return x[:, :, 0] * 0.2989 + x[:, :, 1] * 0.587 + x[:, :, 2] * 0.114


def _view_graph(images, spec, *, gpu: bool, mean, std, fp16: bool):
    fn, types, dmath, _ = dali_modules()

    def arith(node):  # per-sample scalars join GPU arithmetic on the GPU
        return node.gpu() if gpu else node

    def coin(p):
        return fn.cast(fn.random.coin_flip(probability=float(p)), dtype=types.FLOAT)

    x = fn.random_resized_crop(
        images,
        size=[spec.size, spec.size],
        random_area=list(spec.scale),
        random_aspect_ratio=list(spec.ratio),
        num_attempts=10,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    x = fn.cast(x, dtype=types.FLOAT)
    if spec.has_jitter:
        on = coin(spec.jitter_p)
        off = 1.0 - on

        def factor(strength):
            return fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength]) * on + off

        x = dmath.clamp(x * arith(factor(spec.brightness)), 0.0, 255.0)
        c = arith(factor(spec.contrast))
        m = fn.reductions.mean(_gray(x))
        x = dmath.clamp(x * c + (1.0 - c) * m, 0.0, 255.0)
        hue = fn.random.uniform(range=[-spec.hue, spec.hue]) * on * 360.0 if spec.hue > 0 else 0.0
        x = dmath.clamp(fn.hsv(x, hue=hue, saturation=factor(spec.saturation)), 0.0, 255.0)
    if spec.gray_p > 0:
        g = arith(coin(spec.gray_p))
        x = x * (1.0 - g) + fn.expand_dims(_gray(x), axes=[2]) * g
    if spec.blur_p > 0:
        sigma = fn.random.uniform(range=list(spec.blur_sigma))
        blurred = fn.gaussian_blur(x, window_size=spec.blur_kernel, sigma=sigma)
        if spec.blur_p >= 1:
            x = blurred
        else:
            b = arith(coin(spec.blur_p))
            x = blurred * b + x * (1.0 - b)
    if spec.solarize_p > 0:
        s = arith(coin(spec.solarize_p))
        hit = s * fn.cast(x >= float(spec.solarize_threshold) * 255.0, dtype=types.FLOAT)
        x = x + hit * (255.0 - 2.0 * x)
    mirror = fn.random.coin_flip(probability=float(spec.flip_p))
    return fn.crop_mirror_normalize(
        x,
        mirror=mirror,
        mean=[255.0 * v for v in mean],
        std=[255.0 * v for v in std],
        output_layout="CHW",
        dtype=types.FLOAT16 if fp16 else types.FLOAT,
    )


def build_pipeline(
    preset, batch_size: int, *, encoded: bool, gpu: bool, device_id, seed: int, num_threads: int = 2, fp16: bool = False
):
    """A built DALI pipeline whose `external_source` named "images" takes a batch of encoded bytes (uint8 1-D)
    or of decoded uint8 [H, W, 3] arrays, and whose outputs are the preset's views (NCHW, normalized)."""
    fn, types, _, Pipeline = dali_modules()
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if gpu else None,
        seed=seed,
        prefetch_queue_depth=1,
    )
    with pipe:
        if encoded:
            data = fn.external_source(name="images", dtype=types.UINT8, ndim=1)
            if gpu:  # nvJPEG buffers padded up front (DALI's ImageNet values): no reallocation as sizes vary
                images = fn.decoders.image(
                    data,
                    device="mixed",
                    output_type=types.RGB,
                    device_memory_padding=211025920,
                    host_memory_padding=140544512,
                )
            else:
                images = fn.decoders.image(data, device="cpu", output_type=types.RGB)
        else:
            images = fn.external_source(name="images", dtype=types.UINT8, ndim=3, layout="HWC")
            if gpu:
                images = images.gpu()
        outs = [
            _view_graph(images, spec, gpu=gpu, mean=preset.mean, std=preset.std, fp16=fp16)
            for spec in preset.expanded()
        ]
        pipe.set_outputs(*outs)
    pipe.build()
    return pipe


def _to_torch(tensor_list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = tensor_list.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        src_dtype = torch.float16 if "16" in str(t.dtype) else torch.float32
        out = torch.empty(t.shape(), dtype=src_dtype, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
    else:
        out = torch.from_numpy(np.array(t))
    return out.to(dtype)


def _pil_ok(data: np.ndarray) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            im.convert("RGB").load()
        return True
    except Exception:
        return False


class DaliBackend:
    """`SSLLoader(backend="dali")`."""

    def __init__(self, loader):
        dali_modules()  # fail at construction, with the install hint
        self.loader = loader
        self.encoded = isinstance(loader.source, D.FileSource)
        self.gpu = loader.device.type == "cuda"
        self._pipe = None
        self._builds = 0

    def _pipeline(self):
        if self._pipe is None:
            ld = self.loader
            self._pipe = build_pipeline(
                ld.preset,
                ld.batch_size,
                encoded=self.encoded,
                gpu=self.gpu,
                device_id=ld.device.index if self.gpu else None,
                seed=(ld.seed * 1_000_003 + ld.shard_id * 7919 + self._builds) % (2**31 - 1),
                num_threads=ld.num_workers,
                fp16=ld.dtype == torch.float16,
            )
            self._builds += 1
        return self._pipe

    def fetch(self, i: int):
        src = self.loader.source
        if not self.encoded:
            return src.get(i)
        return np.frombuffer(read_image_bytes(src, i), dtype=np.uint8)

    def _run(self, payloads):
        pipe = self._pipeline()
        pipe.feed_input("images", payloads)
        return pipe.run()

    def _isolate(self, payloads) -> set[int]:
        """Positions DALI cannot decode even alone (PIL could): one single-sample run each."""
        bad = set()
        for k, p in enumerate(payloads):
            try:
                self._run([p])
            except RuntimeError:
                self._pipe = None
                bad.add(k)
        return bad

    def process(self, items, batch_no: int, epoch: int) -> list[torch.Tensor]:
        payloads = [p for _, p in items]
        try:
            outs = self._run(payloads)
        except RuntimeError:
            self._pipe = None  # DALI invalidated it
            if not self.encoded:
                raise
            bad = {k for k, p in enumerate(payloads) if not _pil_ok(p)} or self._isolate(payloads)
            if not bad:
                raise
            for k in bad:
                self.loader._mark_bad(items[k][0], "DALI could not decode it")
            filled = self.loader._fill_decoded([None if k in bad else p for k, p in enumerate(payloads)])
            outs = self._run(filled)
        return [_to_torch(o, self.loader.device, self.loader.dtype) for o in outs]
