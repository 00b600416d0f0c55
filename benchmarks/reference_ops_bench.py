"""Baseline timings of the plain-PyTorch losses sslfast replaces, and the two ceilings of the card.

    python benchmarks/reference_ops_bench.py --out runs/<date>-<gpu>-baselines     # everything (CUDA)
    python benchmarks/reference_ops_bench.py --only ntxent moco --out /tmp/b

Writes `<out>/baselines.json` ({"about": ..., "results": {name: {...}}}), the format of
`benchmarks/runs/2026-11-26-h100-baselines/baselines.json`, and prints one line per result.

Timing: CUDA events around one call from an idle device (synchronize, event, call, event, synchronize), median
of the timed calls after warm-up, ms per call; host time counts. `peak_mib` = peak allocated during one call
minus what was allocated before it. `sslfast bench` times its cases the same way, so its reference column and
these numbers are comparable.

Groups (`--only`), with the formulas the references compute (τ: temperature; every loss is forward+backward):
  ceilings  bf16 matmul 8192 x 8192 x 8192, FLOP rate 2·8192³ / t; device-to-device copy of 2²⁹ fp32 values
            (2 GiB each way), byte rate counting read + write.
  ntxent    SimCLR: z = normalize([z1; z2]) (M = 2N rows, D = 128), S = z zᵀ / 0.1 with -inf on the diagonal,
            cross-entropy of S (fp32) against the partner row. N ∈ {4096, 8192, 16384, 32768}, bf16 and fp32;
            `gemm_tflops` counts 6·M²·D.
  moco      MoCo: q, k normalized (N x 128, bf16), l_pos = Σ q∘k, l_neg = q · queueᵀ (queue 65536 x 128, unit
            rows, no gradient), cross-entropy of [l_pos, l_neg] / 0.2 against class 0. N ∈ {256, 1024, 4096}.
  barlow    Barlow Twins (official): per-feature standardization (biased std + 1e-5 added to the std),
            c = z1nᵀ z2n / N, Σ(diag(c) - 1)² + 0.0051 · Σ_{i≠j} c_ij². (N, D) ∈ {(256, 8192), (2048, 8192),
            (1024, 16384)}, bf16 and fp32; `gemm_tflops` counts 6·N·D².
  mae       MAE (official models_mae), ViT-B/16, B = 256, 224 px, bf16: Conv2d patch embedding of all 196
            patches + position embedding then random_masking (two argsorts of uniform noise, gather with a
            repeated index); masking alone; unshuffle (append mask tokens, gather back); norm-pix masked MSE
            (per-patch mean/var normalization, eps 1e-6) forward+backward.
  ema       teacher EMA t ← m·t + (1-m)·s, m = 0.996, over the ViT-B/16 parameter list (150 fp32 tensors, 85.8 M
            parameters): Python loop of mul_/add_, _foreach_mul_ + _foreach_add_, _foreach_lerp_, and one lerp_
            over a flat buffer of the same size (the bandwidth bound); `gbps` counts 12 bytes per parameter.
  clip      open_clip-style symmetric loss: L = 14 · normalize(a) · normalize(b)ᵀ (B x B), (CE(L) + CE(Lᵀ)) / 2
            in fp32 against the diagonal. B ∈ {8192, 32768, 65536}, D ∈ {128, 256}, bf16 and fp32.
A case that runs out of memory is recorded as {"oom": true}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

GROUPS = ("ceilings", "ntxent", "moco", "barlow", "mae", "ema", "clip")


# ------------------------------------------------------------------------------------------------ timing
def event_ms(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 10) -> float:
    """Median CUDA-event time of one call of `fn` from an idle device, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(stop))
    return statistics.median(samples)


def extra_peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory allocated during one call of `fn` beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


class Recorder:
    """Collects results by name and prints each one as it arrives."""

    def __init__(self):
        self.results: dict[str, dict] = {}

    def __call__(self, name: str, **values):
        self.results[name] = values
        print(name, json.dumps(values), flush=True)

    def guarded(self, name: str, measure: Callable[..., dict], **kwargs):
        """Records `measure(**kwargs)` under `name`, or {"oom": True} when it runs out of device memory."""
        try:
            values = measure(**kwargs)
        except torch.OutOfMemoryError:
            values = {"oom": True}
        torch.cuda.empty_cache()
        self(name, **values)


def _tag(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _timed_loss(loss: Callable[[], torch.Tensor], *, warmup: int = 3, repeat: int = 10, flops: float = 0.0) -> dict:
    """ms and peak MiB of `loss().backward()`; with `flops`, also the FLOP rate as `gemm_tflops`."""

    def step():
        loss().backward()

    ms = event_ms(step, warmup=warmup, repeat=repeat)
    row = {"ms": ms, "peak_mib": extra_peak_mib(step)}
    if flops:
        row["gemm_tflops"] = flops / ms / 1e9
    return row


# ------------------------------------------------------------------------------------------------ references
def ntxent_reference(z1, z2, temperature: float = 0.1):
    """SimCLR NT-Xent on the materialized 2N x 2N similarity matrix."""
    n = z1.shape[0]
    z = F.normalize(torch.cat((z1, z2)), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    partner = torch.arange(2 * n).roll(n).to(z.device)  # built on the host and copied, as lightly does
    return F.cross_entropy(logits.float(), partner)


def moco_reference(q, k, queue, temperature: float = 0.2):
    """MoCo InfoNCE: the positive key against a queue of negatives, class 0 = the positive."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat((positive, q @ queue.T), dim=1) / temperature
    return F.cross_entropy(logits.float(), torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def barlow_reference(z1, z2, lambd: float = 0.0051):
    """Barlow Twins on the D x D cross-correlation of per-feature standardized embeddings."""

    def standardize(z):
        return (z - z.mean(dim=0)) / z.std(dim=0, unbiased=False).add(1e-5)

    c = standardize(z1).T @ standardize(z2) / z1.shape[0]
    diag = torch.diagonal(c)
    return (diag - 1).pow(2).sum() + lambd * (c.pow(2).sum() - diag.pow(2).sum())


def clip_reference(image, text, scale: float = 14.0):
    """Symmetric CLIP loss on the materialized B x B logits, cross-entropy in fp32."""
    logits = (scale * F.normalize(image, dim=1) @ F.normalize(text, dim=1).T).float()
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def mae_random_masking(x, ratio: float = 0.75):
    """Official MAE masking: keep the patches of the lowest noise; mask 1 = removed, in original order."""
    batch, length, width = x.shape
    keep = int(length * (1 - ratio))
    ids_shuffle = torch.argsort(torch.rand(batch, length, device=x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    visible = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, width))
    mask = torch.ones(batch, length, device=x.device)
    mask[:, :keep] = 0
    return visible, torch.gather(mask, 1, ids_restore), ids_restore


def mae_unshuffle(visible, ids_restore, mask_token):
    """Official MAE decoder input: append mask tokens, then gather back to patch order."""
    batch, keep, width = visible.shape
    tokens = torch.cat((visible, mask_token.repeat(batch, ids_restore.shape[1] - keep, 1)), dim=1)
    return torch.gather(tokens, 1, ids_restore.unsqueeze(-1).repeat(1, 1, width))


def mae_norm_pix_loss(imgs, pred, mask, patch: int):
    """Official MAE loss: MSE against per-patch normalized pixels (order h w p q c), mean over masked patches."""
    batch, channels, side = imgs.shape[0], imgs.shape[1], imgs.shape[2] // patch
    target = imgs.reshape(batch, channels, side, patch, side, patch)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(batch, side * side, patch * patch * channels)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def vit_b16_parameter_shapes() -> list[tuple[int, ...]]:
    """ViT-B/16 parameters in model order: patch embedding, cls token, positions, 12 blocks, final norm."""
    block = [
        (768,),
        (768,),
        (2304, 768),
        (2304,),
        (768, 768),
        (768,),
        (768,),
        (768,),
        (3072, 768),
        (3072,),
        (768, 3072),
        (768,),
    ]
    return [(768, 3, 16, 16), (768,), (1, 1, 768), (1, 197, 768)] + block * 12 + [(768,), (768,)]


# ------------------------------------------------------------------------------------------------ cases
def _leaves(rows: int, cols: int, dtype: torch.dtype, count: int = 2) -> list[torch.Tensor]:
    return [torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True) for _ in range(count)]


def _ntxent_case(n: int, dim: int, dtype: torch.dtype) -> dict:
    z1, z2 = _leaves(n, dim, dtype)
    return _timed_loss(lambda: ntxent_reference(z1, z2), warmup=2, repeat=5, flops=6 * (2 * n) ** 2 * dim)


def _moco_case(n: int, queue: torch.Tensor) -> dict:
    (q,) = _leaves(n, queue.shape[1], queue.dtype, count=1)
    k = torch.randn_like(q)  # the key encoder gets no gradient
    return _timed_loss(lambda: moco_reference(q, k, queue))


def _barlow_case(n: int, d: int, dtype: torch.dtype) -> dict:
    z1, z2 = _leaves(n, d, dtype)
    return _timed_loss(lambda: barlow_reference(z1, z2).float(), flops=6 * n * d * d)


def _clip_case(b: int, dim: int, dtype: torch.dtype) -> dict:
    image, text = _leaves(b, dim, dtype)
    return _timed_loss(lambda: clip_reference(image, text))


# ------------------------------------------------------------------------------------------------ groups
def _matmul_ceiling(rec: Recorder, size: int = 8192):
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = event_ms(lambda: a @ b)
    rec(f"ceiling_bf16_mm_{size}", ms=ms, tflops=2 * size**3 / ms / 1e9)


def bench_ceilings(rec: Recorder):
    _matmul_ceiling(rec)  # its operands are freed before the copy's 4 GiB are allocated
    torch.cuda.empty_cache()
    src = torch.empty(2**29, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    ms = event_ms(lambda: dst.copy_(src))
    rec("ceiling_copy_8GB", ms=ms, tbps=2 * src.numel() * src.element_size() / ms / 1e9)


def bench_ntxent(rec: Recorder, dim: int = 128):
    for dtype in (torch.bfloat16, torch.float32):
        for n in (4096, 8192, 16384, 32768):
            rec.guarded(f"ntxent_ref_{_tag(dtype)}_N{n}_D{dim}", _ntxent_case, n=n, dim=dim, dtype=dtype)


def bench_moco(rec: Recorder, dim: int = 128, queue_len: int = 65536):
    queue = F.normalize(torch.randn(queue_len, dim, device="cuda", dtype=torch.bfloat16), dim=1)
    for n in (256, 1024, 4096):
        rec.guarded(f"moco_ref_bf16_N{n}_K{queue_len}", _moco_case, n=n, queue=queue)


def bench_barlow(rec: Recorder):
    for dtype in (torch.bfloat16, torch.float32):
        for n, d in ((256, 8192), (2048, 8192), (1024, 16384)):
            rec.guarded(f"barlow_ref_{_tag(dtype)}_N{n}_D{d}", _barlow_case, n=n, d=d, dtype=dtype)


def bench_mae(rec: Recorder, batch: int = 256, image: int = 224, patch: int = 16, width: int = 768):
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    length = (image // patch) ** 2
    imgs = torch.randn(batch, 3, image, image, **bf16)
    embed = torch.nn.Conv2d(3, width, patch, patch).to(**bf16)
    pos = torch.randn(1, length, width, **bf16)

    def tokens():
        return embed(imgs).flatten(2).transpose(1, 2) + pos

    rec(f"mae_ref_embed_all_then_mask_B{batch}", ms=event_ms(lambda: mae_random_masking(tokens())))
    x = tokens()
    rec(f"mae_ref_masking_only_B{batch}", ms=event_ms(lambda: mae_random_masking(x)))
    visible, mask, ids_restore = mae_random_masking(x)
    mask_token = torch.zeros(1, 1, width, **bf16)
    rec(f"mae_ref_unshuffle_B{batch}", ms=event_ms(lambda: mae_unshuffle(visible, ids_restore, mask_token)))
    pred = torch.randn(batch, length, patch * patch * 3, **bf16, requires_grad=True)
    rec(
        f"mae_ref_normpix_loss_fwdbwd_B{batch}",
        ms=event_ms(lambda: mae_norm_pix_loss(imgs, pred, mask, patch).float().backward()),
    )


def bench_ema(rec: Recorder, momentum: float = 0.996):
    shapes = vit_b16_parameter_shapes()
    student = [torch.randn(s, device="cuda") for s in shapes]
    teacher = [torch.randn(s, device="cuda") for s in shapes]
    count = sum(t.numel() for t in student)
    flat_student, flat_teacher = torch.randn(count, device="cuda"), torch.randn(count, device="cuda")

    def loop_mul_add():
        for t, s in zip(teacher, student):
            t.mul_(momentum).add_(s, alpha=1 - momentum)

    def foreach_mul_add():
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1 - momentum)

    ways = {
        "loop_mul_add": loop_mul_add,
        "foreach_mul_add": foreach_mul_add,
        "foreach_lerp": lambda: torch._foreach_lerp_(teacher, student, 1 - momentum),
        "flat_lerp": lambda: flat_teacher.lerp_(flat_student, 1 - momentum),
    }
    for name, fn in ways.items():
        ms = event_ms(fn, warmup=5, repeat=20)
        rec(f"ema_vitb_{name}", ms=ms, params_M=count / 1e6, tensors=len(shapes), gbps=12 * count / ms / 1e6)


def bench_clip(rec: Recorder):
    for dim in (128, 256):
        for b in (8192, 32768, 65536):
            for dtype in (torch.bfloat16, torch.float32):
                rec.guarded(f"clip_ref_{_tag(dtype)}_B{b}_D{dim}", _clip_case, b=b, dim=dim, dtype=dtype)


BENCHES = {
    "ceilings": bench_ceilings,
    "ntxent": bench_ntxent,
    "moco": bench_moco,
    "barlow": bench_barlow,
    "mae": bench_mae,
    "ema": bench_ema,
    "clip": bench_clip,
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for the formulas and shapes of each group.",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=GROUPS,
        default=list(GROUPS),
        metavar="GROUP",
        help=f"groups to run (default: all of {', '.join(GROUPS)})",
    )
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT", "."),
        help="directory for baselines.json (default: $OUT or the current directory)",
    )
    args = parser.parse_args(argv)
    import triton

    if not torch.cuda.is_available():
        parser.error("a CUDA device is required: the baselines are device timings")
    rec = Recorder()
    for group in args.only:
        BENCHES[group](rec)
    about = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timing": "median of CUDA-event timings after warm-up; ms per call; "
        "peak_mib = peak allocated minus allocated before",
        "groups": args.only,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "baselines.json"), "w") as fh:
        json.dump({"about": about, "results": rec.results}, fh, indent=1)
    print("gpu", about["gpu"], "torch", about["torch"], "triton", about["triton"])
    return rec.results


if __name__ == "__main__":
    main()
