"""Teacher-EMA and fused optimizer-step benchmark cases (csrc/ema.cu, csrc/optim.cu).

Parameter lists: ViT-B/16 (the `ema_vitb_*` baselines of benchmarks/reference_ops_bench.py: 150 tensors,
85.80M parameters) and ResNet-50 (161 tensors, 25.56M parameters). Byte floors count the minimal device-memory
traffic per parameter of each fused design (N = parameter count); at the measured 3.0 TB/s copy ceiling of the
reference H100 they give the floor times in the comments:

    EMA fp32                 read teacher + student, write teacher       12 B   ViT-B 1.030 GB → 0.343 ms
    EMA bf16 → fp32 teacher  4 + 2 + 4                                   10 B   ViT-B 0.858 GB → 0.286 ms
    AdamW+EMA fp32           read p g m v t (20), write p m v t (16)     36 B   ViT-B 3.089 GB → 1.030 ms
    AdamW+EMA bf16           half of that                                18 B   ViT-B 1.544 GB → 0.515 ms
    LARS+EMA fp32            pass 1 reads p g (8); pass 2 reads p g μ t   36 B   R-50  0.920 GB → 0.307 ms
                             (16), writes p μ t (12)

The unfused baselines move more: AdamW(fused=True) 28 B + _foreach_lerp_ 12 B = 40 B per fp32 parameter (so
the byte ratio alone allows 1.11×; the rest of the gap is launch count and tail effects), reference LARS
(norms 8 + step 24) + lerp 12 = 44 B.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..ops import _ema_plan as _plan
from ..ops import ema as _ops
from ..ops._csrc import ema as _csrc
from ..ops._torch import ema as _torch
from ..ops.fused_optim import exclude_bias_and_norm
from ..optim import AdamWEMA, LARSEMA
from ..reference import ema as R
from . import Setup, register

MOMENTUM = 0.996
SMALL_CASES: list = []  # the same cases on tiny parameter lists (tests run them on the CPU)


# --------------------------------------------------------------------------------------------- param lists
def vit_b16_shapes() -> list[tuple[int, ...]]:
    """ViT-B/16 parameters in model order (`vit_b16_parameter_shapes` of benchmarks/reference_ops_bench.py)."""
    shapes = [(768, 3, 16, 16), (768,), (1, 1, 768), (1, 197, 768)]
    for _ in range(12):
        shapes += [
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
    return shapes + [(768,), (768,)]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision resnet50() parameters in model order: stem, 16 bottlenecks ([3, 4, 6, 3]), fc."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [
                (width, c_in, 1, 1),
                (width,),
                (width,),
                (width, width, 3, 3),
                (width,),
                (width,),
                (4 * width, width, 1, 1),
                (4 * width,),
                (4 * width,),
            ]
            if b == 0:
                shapes += [(4 * width, c_in, 1, 1), (4 * width,), (4 * width,)]
            c_in = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def small_shapes() -> list[tuple[int, ...]]:
    return [(37, 3, 3, 3), (37,), (1, 5, 48), (48, 37), (48,), (3,)]


LISTS = {"ViT-B/16": vit_b16_shapes, "ResNet-50": resnet50_shapes}


def _numel(shapes) -> int:
    n = 0
    for s in shapes:
        k = 1
        for d in s:
            k *= d
        n += k
    return n


def _tensors(shapes, device, dtype):
    return [torch.randn(s, device=device, dtype=dtype) for s in shapes]


def _both(op: str, name: str, **kw):
    """Registers `factory(device, dtype, shapes)` for each big list and keeps a tiny variant for the tests."""

    def wrap(factory):
        for list_name, shapes in LISTS.items():
            register(op, f"{list_name} {name}", **kw)(
                lambda device, dtype, shapes=shapes: factory(device, dtype, shapes())
            )
        SMALL_CASES.append(lambda device, dtype: factory(device, dtype, small_shapes()))
        return factory

    return wrap


# --------------------------------------------------------------------------------------------- EMA
@_both("ema", "params EMA (12 B/param fp32)", dtypes=(torch.float32,))
def _ema(device, dtype, shapes):
    """sf.ema_update_ on the parameter list vs torch._foreach_lerp_ (reference), the per-parameter loop of
    DINO / MoCo and one lerp over a flat buffer (the bandwidth a flattened model would get).
    Floor 12 B/param: ViT-B 1.030 GB → 0.343 ms, ResNet-50 0.307 GB → 0.102 ms at 3.0 TB/s."""
    teacher, student = _tensors(shapes, device, dtype), _tensors(shapes, device, dtype)
    n = _numel(shapes)
    flat_t, flat_s = torch.randn(n, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)
    others = {
        "loop_mul_add": lambda: R.ema_update_loop_(teacher, student, MOMENTUM),
        "flat_lerp": lambda: flat_t.lerp_(flat_s, 1 - MOMENTUM),
    }
    if device.type == "cuda" and _backend.csrc_available():
        others["csrc_launch_only"] = _launch_only(teacher, student, device)
    return Setup(
        fused=lambda: _ops.ema_update_(teacher, student, MOMENTUM),
        reference=lambda: torch._foreach_lerp_(teacher, student, 1 - MOMENTUM),
        bytes=3.0 * n * teacher[0].element_size(),
        others=others,
    )


def _launch_only(teacher, student, device, chunk_elems: int | None = None):
    """The csrc EMA launches of prebuilt tables, without the per-call checks of `ema_update_`: the kernel time
    plus the bare launch cost (the difference to `fused` is ema_update_'s Python overhead)."""
    keys = [(_plan.dtype_code(t.dtype), _plan.dtype_code(s.dtype)) for t, s in zip(teacher, student)]
    tables = _plan.build_tables(
        list(zip(teacher, student)), keys, depth=_plan.EMA_DEPTH, chunk_elems=chunk_elems or _plan.CHUNK_ELEMS
    )
    ext = _csrc.extension()

    def launch():
        stream = _csrc.stream(device)
        for tbl in tables:
            ext.ema_apply(tbl.data, tbl.dtypes[0], tbl.dtypes[1], 1 - MOMENTUM, 0, stream, device.index or 0)

    return launch


@_both("ema", "bf16 student -> fp32 teacher (10 B/param)", dtypes=(torch.bfloat16,))
def _ema_mixed(device, dtype, shapes):
    """bf16 student, fp32 teacher (mixed-precision training with an fp32 EMA). Reference: what torch allows,
    lerp towards an fp32 copy of the student. Floor 10 B/param: ViT-B 0.858 GB → 0.286 ms."""
    teacher, student = _tensors(shapes, device, torch.float32), _tensors(shapes, device, dtype)
    n = _numel(shapes)
    return Setup(
        fused=lambda: _ops.ema_update_(teacher, student, MOMENTUM),
        reference=lambda: torch._foreach_lerp_(teacher, [s.float() for s in student], 1 - MOMENTUM),
        bytes=float(n * (2 * 4 + student[0].element_size())),
    )


def _ema_chunk_case(chunk_elems: int):
    @register("ema_tune", f"ViT-B/16 params EMA chunk={chunk_elems}", dtypes=(torch.float32,))
    def setup(device, dtype):
        """The csrc EMA launches alone (as `csrc_launch_only` of the `ema` case) with another chunk size
        (elements per block; the default is CHUNK_ELEMS = 8192), to tune it. Floor as the `ema` ViT-B case:
        0.343 ms."""
        shapes = vit_b16_shapes()
        teacher, student = _tensors(shapes, device, dtype), _tensors(shapes, device, dtype)
        n = _numel(shapes)
        reference = lambda: torch._foreach_lerp_(teacher, student, 1 - MOMENTUM)  # noqa: E731
        if not (device.type == "cuda" and _backend.csrc_available()):
            return Setup(
                fused=lambda: _ops.ema_update_(teacher, student, MOMENTUM), reference=reference, bytes=3.0 * n * 4
            )
        return Setup(fused=_launch_only(teacher, student, device, chunk_elems), reference=reference, bytes=3.0 * n * 4)

    return setup


for _chunk in (2048, 4096, 8192, 16384, 32768):
    _ema_chunk_case(_chunk)


# --------------------------------------------------------------------------------------------- AdamW + EMA
def _params_with_grads(shapes, device, dtype):
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


@_both("adamw_ema", "AdamW step + EMA (fp32 36 B/param, bf16 18)", dtypes=(torch.float32, torch.bfloat16))
def _adamw_ema(device, dtype, shapes):
    """sslfast.optim.AdamWEMA.step() (one kernel: AdamW + teacher EMA) vs torch.optim.AdamW(fused=True).step()
    + torch._foreach_lerp_(teacher, params) (reference; `fused=True` where torch supports the device, else
    foreach). Params, grads, moments and teacher in `dtype`. Floor fp32 36 B/param: ViT-B 3.089 GB → 1.030 ms,
    ResNet-50 0.920 GB → 0.307 ms; bf16 half of that."""
    mine, ref = _params_with_grads(shapes, device, dtype), _params_with_grads(shapes, device, dtype)
    t_mine, t_ref = _tensors(shapes, device, dtype), _tensors(shapes, device, dtype)
    kw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    opt = AdamWEMA(mine, teacher=t_mine, ema_momentum=MOMENTUM, **kw)
    torch_opt = torch.optim.AdamW(ref, fused=device.type == "cuda", **kw)

    def reference():
        torch_opt.step()
        torch._foreach_lerp_(t_ref, ref, 1 - MOMENTUM)

    n = _numel(shapes)
    return Setup(fused=opt.step, reference=reference, bytes=float(n * (5 + 4) * mine[0].element_size()))


# --------------------------------------------------------------------------------------------- LARS + EMA
@_both("lars_ema", "LARS step + EMA (fp32 36 B/param)", dtypes=(torch.float32,))
def _lars_ema(device, dtype, shapes):
    """sslfast.optim.LARSEMA.step() (norm pass + update pass, no host sync) vs sslfast's PyTorch LARS + EMA
    (foreach ops, norms on the device), and the official per-parameter LARS loop (Barlow Twins) +
    _foreach_lerp_. BYOL hyper-parameters (wd 1.5e-6, eta 1e-3, biases and norms excluded).
    Floor 36 B/param: ViT-B 3.089 GB → 1.030 ms, ResNet-50 0.920 GB → 0.307 ms."""
    kw = dict(lr=0.2, momentum=0.9, weight_decay=1.5e-6, eta=1e-3)
    mine, ref, lit = (_params_with_grads(shapes, device, dtype) for _ in range(3))
    t_mine, t_ref, t_lit = (_tensors(shapes, device, dtype) for _ in range(3))
    opt = LARSEMA(mine, teacher=t_mine, ema_momentum=MOMENTUM, **kw)
    bufs_ref = [torch.zeros_like(p) for p in ref]
    bufs_lit = [torch.zeros_like(p) for p in lit]
    keep = [not exclude_bias_and_norm(p) for p in ref]

    def reference():
        _torch.lars_foreach_step_(
            ref, [p.grad for p in ref], bufs_ref, t_ref, decay=keep, adapt=keep, ema_momentum=MOMENTUM, **kw
        )

    def literal():
        R.lars_step_literal_(lit, [p.grad for p in lit], bufs_lit, decay=keep, adapt=keep, **kw)
        torch._foreach_lerp_(t_lit, lit, 1 - MOMENTUM)

    n = _numel(shapes)
    return Setup(
        fused=opt.step,
        reference=reference,
        bytes=float(n * 9 * mine[0].element_size()),
        others={"literal_loop+lerp": literal},
    )
