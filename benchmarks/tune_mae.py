"""Launch-config sweep for the MAE kernels that read whole patches from the images: the norm-pix loss
forward and backward and `gather_patches` (ViT-B/16, B = 256, 224 px, bf16, 75 % masked).

For each candidate (patches per program BLOCK_R, warps) it checks the output against the default config's and,
on a GPU, times the bare kernel call with triton.testing.do_bench (L2 flushed between calls). Byte floors
(what each pass must move): forward reads pred and the images, 2·B·L·E·2 B; backward reads the masked rows
of both and writes dpred, (2·0.75 + 1)·B·L·E·2 B; gather_patches reads the kept patches and writes them,
2·B·K·E·2 B. The winners set `_patch_cfg`'s lanes per thread in kernels/mae.py.

    python benchmarks/tune_mae.py [--only 4:4 8:8] [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/tune_mae.py --device cpu      (checks the configs on tiny shapes)
"""

from __future__ import annotations

import argparse
import json

import torch

from sslfast.kernels import mae as K

CANDIDATES = [(br, w) for br in (1, 2, 4, 8) for w in (2, 4, 8)]


def problems(device, batch):
    """{name: (call, bytes)}; each call runs one pass through the kernels layer with the current `_patch_cfg`."""
    p, C, side, keep = 16, 3, 224, 49
    L, E = (side // p) ** 2, p * p * C
    g = torch.Generator(device=device).manual_seed(0)
    imgs = torch.randn(batch, C, side, side, device=device, generator=g).to(torch.bfloat16)
    pred = torch.randn(batch, L, E, device=device, generator=g).to(torch.bfloat16)
    ids = torch.rand(batch, L, device=device, generator=g).argsort(1)
    mask = torch.ones(batch, L, device=device)
    mask.scatter_(1, ids[:, :keep], 0.0)
    loss, wsum, _ = K.masked_mse(pred, imgs, mask, p, True)
    one = torch.ones((), device=device)
    n = batch * L * E * 2
    return {
        "masked_mse fwd (norm-pix)": (lambda: K.masked_mse(pred, imgs, mask, p, True)[0], 2 * n),
        "masked_mse fwd+grad (norm-pix)": (lambda: K.masked_mse(pred, imgs, mask, p, True, True)[2], 3 * n),
        "masked_mse bwd (norm-pix)": (
            lambda: K.masked_mse_backward(one, pred, imgs, mask, wsum, p, True),
            (2 * (L - keep) / L + 1) * n,
        ),
        "gather_patches (kept 25 %)": (lambda: K.gather_patches(imgs, ids[:, :keep].contiguous(), p), 2 * n * keep / L),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", nargs="+", metavar="BLOCK_R:WARPS", help="these candidates only")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    candidates = [tuple(map(int, c.split(":"))) for c in args.only] if args.only else CANDIDATES
    device = torch.device(args.device)
    batch = 256 if device.type == "cuda" else 2
    default_cfg = K._patch_cfg
    rows = []
    try:
        for name, (call, nbytes) in problems(device, batch).items():
            expect = call()
            for br, warps in candidates:
                K._patch_cfg = lambda p, C, lanes, br=br, warps=warps: {
                    **default_cfg(p, C, lanes),
                    "BLOCK_R": br,
                    "num_warps": warps,
                }
                out = call()
                tol = 1e-5 if out.dtype == torch.float32 else 8e-3  # a bf16 output may round the other way
                ok = bool(torch.allclose(out.float(), expect.float(), rtol=tol, atol=tol))
                row = {"pass": name, "BLOCK_R": br, "num_warps": warps, "matches_default": ok}
                if device.type == "cuda":
                    import triton.testing

                    row["ms"] = triton.testing.do_bench(call, warmup=10, rep=50)
                    row["TB/s"] = nbytes / row["ms"] / 1e9
                rows.append(row)
                print(json.dumps(row), flush=True)
            if device.type == "cuda":
                best = min((r for r in rows if r["pass"] == name and r["matches_default"]), key=lambda r: r["ms"])
                print(
                    f"BEST {name}: BLOCK_R={best['BLOCK_R']} num_warps={best['num_warps']} {best['ms']:.4f} ms "
                    f"({best['TB/s']:.2f} TB/s)",
                    flush=True,
                )
    finally:
        K._patch_cfg = default_cfg
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not all(r["matches_default"] for r in rows):
        raise SystemExit("some configs disagree with the default")


if __name__ == "__main__":
    main()
