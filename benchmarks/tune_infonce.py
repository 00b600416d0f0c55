"""Tile sweep for the InfoNCE kernels on the current GPU (run by benchmarks/gpu_check.sh).

Times the forward statistics pass and the backward row pass separately for each candidate tile shape at the
shapes that matter (NT-Xent 2x16384 D=128, its forward both symmetric and as the full square; CLIP B=32768
with column statistics; MoCo N=4096 K=65536), and prints the best per pass. The winners are copied into
`GPU_TILES` (or, when they hold for D <= 128 only, `NARROW_TILES`) in kernels/infonce.py.
"""

import argparse
import json

import torch
import triton

from sslfast.bench import time_ms
from sslfast.kernels import infonce as K
from sslfast.ops.infonce import IndexMaps

CANDIDATES = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4),
]


def _deterministic(fn):
    """`fn` under torch.use_deterministic_algorithms: the symmetric forward takes its full-square schedule."""

    def run():
        torch.use_deterministic_algorithms(True)
        try:
            return fn()
        finally:
            torch.use_deterministic_algorithms(False)

    return run


def problems(dtype):
    """{(pass, name, bounded): call}; `bounded` picks the tile entry the call uses (`K.tile_entry`, D=128)."""
    dev = "cuda"
    z = torch.randn(32768, 128, device=dev, dtype=dtype)
    img, txt = torch.randn(32768, 128, device=dev, dtype=dtype), torch.randn(32768, 128, device=dev, dtype=dtype)
    q, queue = torch.randn(4096, 128, device=dev, dtype=dtype), torch.randn(65536, 128, device=dev, dtype=dtype)
    s10, s14 = torch.tensor(10.0, device=dev), torch.tensor(14.0, device=dev)
    nt_maps = IndexMaps(pos_shift=16384, pos_period=32768)
    g = torch.full((32768,), 1 / 32768, device=dev)
    lse = torch.full((32768,), 8.0, device=dev)
    rn_z, rn_i, rn_t, rn_q, rn_k = (K.row_rnorm(x) for x in (z, img, txt, q, queue))
    z, _, rn_z, _ = K.tile_operands(z, z, rn_z, rn_z)  # what the ops pass (fp16 unit rows for fp32 inputs)
    img, txt, rn_i, rn_t = K.tile_operands(img, txt, rn_i, rn_t)
    q, queue, rn_q, rn_k = K.tile_operands(q, queue, rn_q, rn_k)

    def nt_fwd():
        return K.similarity_lse(
            z, z, rn_z, rn_z, s10, nt_maps, exclude_self=True, want_pos=True, col_stats=False, bounded=True
        )

    return {
        ("fwd", "nt_xent 2x16384 (symmetric)", True): nt_fwd,
        ("fwd", "nt_xent 2x16384 (full square)", True): _deterministic(nt_fwd),
        ("fwd", "clip 32768 col-stats", False): lambda: K.similarity_lse(
            img, txt, rn_i, rn_t, s14, IndexMaps(), exclude_self=False, want_pos=True, col_stats=True, bounded=False
        ),
        ("fwd", "moco 4096x65536", True): lambda: K.similarity_lse(
            q, queue, rn_q, rn_k, s10, IndexMaps(), exclude_self=False, want_pos=False, col_stats=False, bounded=True
        ),
        ("bwd", "nt_xent 2x16384", True): lambda: K.similarity_lse_rows_grad(
            z,
            z,
            rn_z,
            rn_z,
            s10,
            nt_maps,
            exclude_self=True,
            bounded=True,
            lse_r=lse,
            g_r=g,
            lse_c=lse,
            g_c=g,
            g_pr=-g,
            g_pc=-g,
        ),
        ("bwd", "clip 32768 rows", False): lambda: K.similarity_lse_rows_grad(
            img,
            txt,
            rn_i,
            rn_t,
            s14,
            IndexMaps(),
            exclude_self=False,
            bounded=False,
            lse_r=lse,
            g_r=g,
            lse_c=lse,
            g_c=g,
            g_pr=-g,
            want_dscale=True,
        ),
        ("bwd", "moco 4096x65536", True): lambda: K.similarity_lse_rows_grad(
            q, queue, rn_q, rn_k, s10, IndexMaps(), exclude_self=False, bounded=True, lse_r=lse[:4096] + 3, g_r=g[:4096]
        ),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16"])
    parser.add_argument("--problems", nargs="*", help="substrings of problem names to keep")
    parser.add_argument("--candidates", type=int, default=len(CANDIDATES), help="try the first N candidates")
    args = parser.parse_args()
    results = []
    for dtype in (getattr(torch, d) for d in args.dtypes):
        for (kind, name, bounded), fn in problems(dtype).items():
            if args.problems and not any(p in name for p in args.problems):
                continue
            table, key = K.tile_entry(kind, True, bounded, 128)  # the entry these D = 128 problems read
            saved = dict(table[key])
            for cfg in CANDIDATES[: args.candidates]:
                table[key] = cfg
                try:
                    ms = time_ms(fn, torch.device("cuda"), warmup=2, repeat=5)
                except (triton.runtime.errors.OutOfResources, RuntimeError) as err:
                    ms = None
                    print(kind, name, cfg, "failed:", str(err).splitlines()[0][:120])
                results.append({"kind": kind, "problem": name, "dtype": str(dtype)[6:], "cfg": cfg, "ms": ms})
                print(json.dumps(results[-1]), flush=True)
            table[key] = saved
    best = {}
    for r in results:
        key = f"{r['kind']} {r['problem']} {r['dtype']}"
        if r["ms"] is not None and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    for key, r in best.items():
        print(f"BEST {key}: {r['ms']:.3f} ms {r['cfg']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
