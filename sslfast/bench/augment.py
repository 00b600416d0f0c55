"""Benchmark cases for multi-view augmentation: images per second from JPEG files to normalized views on
the device, for SimCLR (2 × 224) and DINO (2 × 224 + 8 × 96), B = 256 images per call.

JPEGs are written once per process (512 files cycling through 32 synthetic photo-like 500×375 images,
quality 90, ~57 KB each, in a temporary folder; the page cache holds them, as it would a warm data set).

Timed callables, one batch of B images each (images/s = B / ms · 1000):
  fused      `SSLLoader(backend="native")`: host threads read the files, nvJPEG decodes the batch on the GPU
             (torchvision.io.decode_jpeg), sslfast's fused kernel writes every view;
  reference  the CPU loader users run today: torch DataLoader with min(16, cpus) worker processes, PIL decode
             and torchvision v2 transforms per sample (the papers' recipe: RandomResizedCrop,
             RandomHorizontalFlip, RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur),
             RandomSolarize, Normalize), pinned and copied to the device. Workers produce mini-batches of 16
             so all of them stay busy; a call gathers B images. Without torchvision the workers run
             sslfast's PyTorch reference augmentation per sample instead;
  augment_only  the fused kernel alone on a batch already decoded on the device;
  dali       `SSLLoader(backend="dali")` on the GPU, when nvidia-dali imports.

Byte floor of the fused path per call: decoded pixels written once by the decoder and read once by the
augmentation (2 · 3 · 500 · 375 per image) plus the views written (3 · ΣS² per image, output dtype).
No FLOP count: the work is gathers and elementwise math.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import torch

from . import Setup, register

BATCH = 256
IMAGE_WH = (500, 375)
N_FILES = 512
MINI = 16


@functools.lru_cache(maxsize=None)
def _jpeg_folder(n: int, size: tuple[int, int]) -> str:
    from ..data.synthetic import write_jpeg_folder

    root = tempfile.mkdtemp(prefix="sslfast-bench-jpeg-")
    atexit.register(shutil.rmtree, root, True)
    write_jpeg_folder(root, n, size, classes=4, seed=0, distinct=32)
    return root


def _cycle(loader):
    while True:
        yield from loader


class _CpuViews(torch.utils.data.Dataset):
    """PIL decode + per-sample augmentation of every view (picklable for worker processes)."""

    def __init__(self, paths, preset, length):
        self.paths, self.preset, self.length = list(paths), preset, length
        self._tf = None

    def __len__(self):
        return self.length

    def _transforms(self):
        if self._tf is None:
            try:
                self._tf = [_torchvision_view(s, self.preset.mean, self.preset.std) for s in self.preset.expanded()]
            except ImportError:
                self._tf = [functools.partial(_reference_view, s, self.preset) for s in self.preset.expanded()]
        return self._tf

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i % len(self.paths)]) as im:
            im = im.convert("RGB")
            return [t(im) for t in self._transforms()]


def _torchvision_view(spec, mean, std):
    from torchvision.transforms import v2

    t = [
        v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True),
        v2.RandomHorizontalFlip(spec.flip_p),
    ]
    if spec.has_jitter:
        t.append(
            v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p)
        )
    if spec.gray_p > 0:
        t.append(v2.RandomGrayscale(spec.gray_p))
    if spec.blur_p > 0:
        t.append(v2.RandomApply([v2.GaussianBlur(spec.blur_kernel, sigma=spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        t.append(v2.RandomSolarize(threshold=round(spec.solarize_threshold * 255), p=spec.solarize_p))
    t += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(t)


def _reference_view(spec, preset, im):
    import numpy as np

    from ..ops import augment as aug
    from ..reference import augment as ref

    img = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    sizes = torch.tensor([[img.shape[1], img.shape[2]]], dtype=torch.int32)
    p = aug.sample_view_params(spec, sizes)[0, 0].tolist()
    x = ref.augment_one(img, p, spec.size, spec.size, spec.blur_kernel, torch.float32)
    m = torch.tensor(preset.mean).view(3, 1, 1)
    s = torch.tensor(preset.std).view(3, 1, 1)
    return (x - m) / s


def _cpu_loader(paths, preset, device, dtype, batch):
    workers = min(16, os.cpu_count() or 1) if device.type == "cuda" else 0
    mini = MINI if workers else batch
    ds = _CpuViews(paths, preset, length=10**9)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=mini,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,
    )
    it = iter(dl)

    def step():
        parts = [next(it) for _ in range(batch // mini)]
        return [torch.cat([p[v] for p in parts]).to(device, dtype, non_blocking=True) for v in range(len(parts[0]))]

    return step


def _case(preset_name: str, batch: int, image_wh: tuple[int, int], n_files: int, image_size=None):
    def setup(device, dtype):
        from ..data import SSLLoader, get_preset
        from ..data.datasets import find_images
        from ..ops import augment as aug

        preset = get_preset(preset_name, image_size)
        root = _jpeg_folder(n_files, image_wh)
        loader = SSLLoader(
            root,
            preset=preset,
            batch_size=batch,
            backend="native",
            device=device,
            dtype=dtype,
            seed=0,
            num_workers=min(16, os.cpu_count() or 1),
        )
        fused_it = _cycle(loader)
        paths = find_images(root).paths
        others = {}
        # The kernel alone, on a batch decoded once.
        from PIL import Image
        import numpy as np

        arrays = []
        for p in paths[:batch]:
            with Image.open(p) as im:
                arrays.append(torch.from_numpy(np.array(im.convert("RGB"))))
        flat, offs, sizes = aug.pack_images(torch.stack(arrays).to(device))
        gen = torch.Generator(device=device).manual_seed(0)
        others["augment_only"] = lambda: aug.augment_batch(
            flat, offs, sizes, preset.views, dtype=dtype, mean=preset.mean, std=preset.std, generator=gen
        )
        if device.type == "cuda":
            from ..data.dali import dali_available

            if dali_available():
                dl = SSLLoader(root, preset=preset, batch_size=batch, backend="dali", device=device, dtype=dtype)
                dali_it = _cycle(dl)
                others["dali"] = lambda: next(dali_it)
        w, h = image_wh
        out_bytes = 3 * sum(s * s for s in preset.sizes()) * torch.empty((), dtype=dtype).element_size()
        return Setup(
            fused=lambda: next(fused_it),
            reference=_cpu_loader(paths, preset, device, dtype, batch),
            flops=0.0,
            bytes=batch * (2 * 3 * w * h + out_bytes),
            others=others,
        )

    return setup


register("augment", f"simclr 2x224 from JPEG 500x375, B={BATCH}", dtypes=(torch.bfloat16,))(
    _case("simclr", BATCH, IMAGE_WH, N_FILES)
)
register("augment", f"dino 2x224+8x96 from JPEG 500x375, B={BATCH}", dtypes=(torch.bfloat16,))(
    _case("dino", BATCH, IMAGE_WH, N_FILES)
)
register("augment", "simclr 2x32 from JPEG 64x48, B=8 (smoke)", dtypes=(torch.float32,), device_types=("cpu",))(
    _case("simclr", 8, (64, 48), 16, image_size=32)
)
