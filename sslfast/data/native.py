"""The native backend: decode, then sslfast's fused augmentation kernel (no DALI).

Per batch:
1. host threads read each file and check it (`datasets.looks_like_image`); on the CPU path (or for non-JPEG
   files) they also decode it with PIL into uint8 [H, W, 3];
2. on CUDA with torchvision importable, the batch's JPEGs are decoded together on the GPU
   (`torchvision.io.decode_jpeg(list, device="cuda")`, nvJPEG) into [3, H, W]; a batch that fails is
   decoded image by image so one bad file costs only itself (then PIL on the host, then skipped);
3. the decoded images are packed into one flat uint8 buffer with per-image offsets and (H, W)
   (`sslfast.ops.augment.pack_images`: no padding, one copy);
4. per-(view, sample) parameters are drawn on the device from a generator seeded by
   (seed, epoch, shard, batch), and `sslfast.ops.augment.augment_batch` writes every view: one fused kernel
   per view size, plus the separable blur passes for the samples that are blurred.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import torch

from ..ops import augment as aug
from . import datasets as D


class BadSample(Exception):
    """A sample that cannot be read or decoded (the loader skips and counts it)."""


def read_image_bytes(source, i: int) -> bytes:
    """The encoded bytes of sample i; BadSample when the file cannot be read or is not an image."""
    try:
        data = source.read(i)
    except OSError as err:
        raise BadSample(f"unreadable ({err})") from err
    if not D.looks_like_image(data):
        raise BadSample("not an image (bad magic bytes or truncated)")
    return data


@functools.lru_cache(maxsize=None)
def torchvision_decode_jpeg():
    """torchvision.io.decode_jpeg when torchvision imports (it does not beside the CPU-only torch 2.13)."""
    try:
        from torchvision.io import decode_jpeg
    except Exception:  # ImportError, or a torchvision built for another torch failing at import
        return None
    return decode_jpeg


def decode_pil(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] RGB from encoded bytes (PIL; grayscale, palette and CMYK converted)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            return np.array(im, dtype=np.uint8)  # a writable copy
    except Exception as err:  # PIL raises many types for corrupt data
        raise BadSample(f"undecodable image ({type(err).__name__}: {err})") from err


def decode_gpu(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """[3, H, W] uint8 CUDA tensors for JPEG bytes (None where decoding failed)."""
    decode_jpeg = torchvision_decode_jpeg()
    from torchvision.io import ImageReadMode

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:
        out = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except Exception:
                out.append(None)
        return out


def pack_hwc(arrays: list[np.ndarray], device: torch.device):
    """(flat, offsets, sizes) on `device` from host [H, W, 3] uint8 arrays: one host concat, one (pinned,
    asynchronous) upload."""
    if len({a.shape for a in arrays}) == 1:
        host = torch.from_numpy(np.stack(arrays))
        if device.type == "cuda":
            host = host.pin_memory()
        return aug.pack_images(host.to(device, non_blocking=True), chw=False)
    sizes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int32)
    lengths = [a.size for a in arrays]
    offsets = torch.tensor([0] + lengths[:-1], dtype=torch.int64).cumsum(0)
    host = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]))
    if device.type == "cuda":
        host = host.pin_memory()
    return (
        host.to(device, non_blocking=True),
        offsets.to(device, non_blocking=True),
        sizes.to(device, non_blocking=True),
    )


class NativeBackend:
    """Decode + fused augmentation for `SSLLoader(backend="native")`."""

    def __init__(self, loader):
        self.loader = loader
        self.device = loader.device
        self.files = isinstance(loader.source, D.FileSource)
        self.gpu_decode = self.files and self.device.type == "cuda" and torchvision_decode_jpeg() is not None

    def fetch(self, i: int):
        """Host work for one sample (runs in the loader's threads): ('jpeg', bytes) for GPU decode, else
        ('hwc', uint8 [H, W, 3])."""
        src = self.loader.source
        if not self.files:
            return "hwc", src.get(i)
        data = read_image_bytes(src, i)
        if self.gpu_decode and D.is_jpeg(data):
            return "jpeg", data
        return "hwc", decode_pil(data)

    def _decode(self, items):
        """CUDA path: [3, H, W] device tensors, None where decoding failed."""
        jpeg_pos = [k for k, (_, (kind, _)) in enumerate(items) if kind == "jpeg"]
        out: list[torch.Tensor | None] = [None] * len(items)
        if jpeg_pos:
            decoded = decode_gpu([items[k][1][1] for k in jpeg_pos], self.device)
            for k, t in zip(jpeg_pos, decoded):
                if t is None:  # nvJPEG refused it: give PIL a chance (CMYK, odd subsampling)
                    try:
                        t = torch.from_numpy(decode_pil(items[k][1][1])).to(self.device).permute(2, 0, 1)
                    except BadSample as err:
                        self.loader._mark_bad(items[k][0], str(err))
                        continue
                out[k] = t
        for k, (_, (kind, arr)) in enumerate(items):
            if kind == "hwc":
                out[k] = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, non_blocking=True).permute(2, 0, 1)
        return out

    def process(self, items, batch_no: int, epoch: int) -> list[torch.Tensor]:
        """items: [(index, payload)] all readable; returns the views of the batch."""
        loader = self.loader
        if any(kind == "jpeg" for _, (kind, _) in items):
            imgs = self._decode(items)
            imgs = loader._fill_decoded(imgs)
            flat, offsets, sizes = aug.pack_images([t.contiguous() for t in imgs], chw=True)
            chw = True
        else:
            flat, offsets, sizes = pack_hwc([arr for _, (_, arr) in items], self.device)
            chw = False
        gen = torch.Generator(device=self.device)
        gen.manual_seed(loader._batch_seed(epoch, batch_no))
        preset = loader.preset
        views = aug.augment_batch(
            flat,
            offsets,
            sizes,
            preset.views,
            chw=chw,
            dtype=loader.dtype,
            mean=preset.mean,
            std=preset.std,
            generator=gen,
        )
        return views
