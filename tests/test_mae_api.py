"""The MAE ops' public surface: argument checks, exports, the benchmark cases on CPU, the kernels' ahead-of-time
sm_90 build, and the GPU checks on the real kernels (marked `gpu`)."""

import pytest
import torch

import sslfast as sf
from sslfast import mae
from sslfast.models.mae import MaskedPatchEmbed
from sslfast.ops._torch import mae as pt
from sslfast.reference import mae as R

from aot_compile import check_compiles
from helpers import assert_close, leaf, tol
from mae_helpers import gather


# ----------------------------------------------------------------------------------------- bad input
def test_bad_inputs(backend):
    imgs = torch.randn(2, 3, 16, 16)
    m = mae.random_masking(2, 16, 0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.random_masking(2, 16, 0.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.random_masking(2, 16, 1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.random_masking(2, 16, -0.2)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.random_masking(2, 16, 0.99)  # keeps no patch
    with pytest.raises(TypeError, match="mask_ratio"):
        mae.random_masking(2, 16, "0.5")
    with pytest.raises(ValueError, match="batch_size"):
        mae.random_masking(0, 16, 0.5)
    with pytest.raises(TypeError, match="num_patches"):
        mae.random_masking(2, 16.0, 0.5)
    with pytest.raises(TypeError, match="generator"):
        mae.random_masking(2, 16, 0.5, generator=3)
    with pytest.raises(ValueError, match="grid_size"):
        mae.random_masking(2, 50, 0.5, block_size=2)
    with pytest.raises(ValueError, match="block_size"):
        mae.random_masking(2, 36, 0.5, block_size=4)
    with pytest.raises(ValueError, match="grid_size"):
        mae.random_masking(2, 32, 0.5, block_size=2, grid_size=(4, 4))
    # images and patch size
    with pytest.raises(ValueError, match="patch_size"):
        mae.patchify(torch.randn(2, 3, 16, 18), 4)
    with pytest.raises(ValueError, match="patch_size"):
        mae.gather_patches(torch.randn(2, 3, 18, 16), m.ids_keep, 4)
    with pytest.raises(ValueError, match="imgs"):
        mae.patchify(torch.randn(3, 16, 16), 4)
    with pytest.raises(TypeError, match="imgs"):
        mae.patchify(torch.randint(0, 9, (2, 3, 16, 16)), 4)
    with pytest.raises(ValueError, match="patch_size"):
        mae.patchify(imgs, 0)
    # ids out of range / wrong shape / dtype
    with pytest.raises(ValueError, match="ids_keep"):
        mae.gather_patches(imgs, m.ids_keep + 16, 4)
    with pytest.raises(ValueError, match="ids_keep"):
        mae.gather_patches(imgs, -m.ids_keep - 1, 4)
    with pytest.raises(ValueError, match="ids_keep"):
        mae.gather_patches(imgs, m.ids_keep[:1], 4)
    with pytest.raises(TypeError, match="ids_keep"):
        mae.gather_patches(imgs, m.ids_keep.float(), 4)
    x = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match="ids_keep"):
        mae.gather_tokens(x, m.ids_keep * 3)
    with pytest.raises(ValueError, match="x"):
        mae.gather_tokens(x[0], m.ids_keep)
    xv = torch.randn(2, m.ids_keep.shape[1], 8)
    mt = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="ids_restore"):
        mae.unshuffle(xv, m.ids_restore + 1, mt)
    with pytest.raises(ValueError, match="ids_restore"):
        mae.unshuffle(xv, m.ids_restore[:, :4], mt)
    with pytest.raises(ValueError, match="ids_restore"):
        mae.unshuffle(xv, m.ids_restore[0], mt)
    with pytest.raises(ValueError, match="mask_token"):
        mae.unshuffle(xv, m.ids_restore, torch.zeros(1, 1, 7))
    with pytest.raises(ValueError, match="pos_embed"):
        mae.unshuffle(xv, m.ids_restore, mt, torch.zeros(1, 15, 8))
    with pytest.raises(ValueError, match="x_visible"):
        mae.unshuffle(xv[:1], m.ids_restore, mt)
    with pytest.raises(TypeError, match="mask_token"):
        mae.unshuffle(xv, m.ids_restore, torch.zeros(1, 1, 8, dtype=torch.int64))
    # loss shapes
    pred = torch.randn(2, 16, 48)
    with pytest.raises(ValueError, match="pred"):
        mae.masked_mse_loss(pred[:, :, :47], imgs, m.mask, 4)
    with pytest.raises(ValueError, match="pred"):
        mae.masked_mse_loss(pred, imgs, m.mask, 2)
    with pytest.raises(ValueError, match="mask"):
        mae.masked_mse_loss(pred, imgs, m.mask[:, :15], 4)
    with pytest.raises(TypeError, match="mask"):
        mae.masked_mse_loss(pred, imgs, m.mask.long(), 4)
    with pytest.raises(ValueError, match="patch_size"):
        mae.masked_mse_loss(pred, torch.randn(2, 3, 16, 15), m.mask, 4)
    with pytest.raises(TypeError, match="norm_pix_loss"):
        mae.masked_mse_loss(pred, imgs, m.mask, 4, norm_pix_loss=1)
    with pytest.raises(ValueError, match="mlm_probability"):
        mae.bert_masking(torch.ones(4, dtype=torch.long), 1, 10, 1.5)


def test_public_exports():
    """`sslfast.mae` and `sslfast.ops.mae` export the same objects, defined once in the ops' submodules."""
    assert sf.mae.random_masking is mae.random_masking
    for name in sf.mae.__all__:
        assert getattr(sf.ops.mae, name) is getattr(sf.mae, name), name
    assert sf.ops.mae.FAMILY.name == "mae" and sf.ops.mae.MaskInfo is sf.ops.mae_common.MaskInfo
    from sslfast.ops import masked_mse_loss, unshuffle  # noqa: F401


def test_bench_cases_run_on_cpu(backend, monkeypatch):
    """The GPU bench cases, shrunk: every fused/reference callable runs and the floors are positive."""
    from sslfast.bench import mae as bench_mae

    for make in bench_mae.SMALL_CASES:
        st = make(torch.device("cpu"), torch.float32)
        st.fused()
        st.reference()
        for fn in st.others.values():
            fn()
        assert st.bytes > 0


def test_kernels_compile_for_sm90():
    """Every kernel compiles ahead of time to an sm_90 cubin at the launchers' GPU tiles (no GPU needed), without
    register spills; at p=16 the patch kernels read images and predictions as 16-byte vectors."""
    out = check_compiles("""
import sslfast.kernels.mae as K

ALIGNED = ("n_rows", "stride_pb")  # patch kernels: multiples of 16 at B=256, 224 px (the JIT specializes them)

def loads(k, img, p):  # bf16 images, p=16: 16-byte and 2-byte global loads, warp shuffles
    if img == "bf16" and p == 16:
        ptx = k.asm["ptx"]
        print("loads", ptx.count("ld.global.v4.b32"), ptx.count("ld.global.b16"), ptx.count("shfl."))

for mem in (True, False):
    build(K._random_masking_kernel, dict(SEED="*i64", seed_val="i64", IDS_KEEP="*i64", IDS_RESTORE="*i64",
          MASK="*fp32"), dict(SEED_IN_MEMORY=mem, BLOCK_L=256), 2)
for dt in ("bf16", "fp32"):
    for p, C in ((16, 3), (16, 1), (14, 3)):
        cfg = K._patch_cfg(p, C, K.GATHER_LANES_PER_THREAD)
        warps = cfg.pop("num_warps")
        for all_ in (True, False):
            k = build(K._gather_patches_kernel, dict(IMG="*" + dt, IDS="*i64", OUT="*" + dt),
                      dict(P=p, C=C, ALL=all_, **cfg), warps, aligned=ALIGNED)
            loads(k, dt, p)
        cfg = K._patch_cfg(p, C, K.MSE_LANES_PER_THREAD)
        warps = cfg.pop("num_warps")
        for kern, flags in ((K._masked_mse_fwd_kernel, dict(WANT_GRAD=False)),
                            (K._masked_mse_fwd_kernel, dict(WANT_GRAD=True)), (K._masked_mse_bwd_kernel, {})):
            for img in sorted({dt, "fp32"}):  # fp32 images with bf16 predictions: AMP
                k = build(kern, dict(G="*fp32", WSUM="*fp32", PRED="*" + dt, IMG="*" + img, MASK="*fp32",
                          PART="*fp32", DPRED="*" + dt, eps="fp32", stride_pb="i64"),
                          dict(P=p, C=C, NORM=True, **flags, **cfg), warps, aligned=ALIGNED)
                loads(k, img, p)
    for mt in (True, False):
        build(K._gather_rows_kernel, dict(X="*" + dt, IDX="*i64", OUT="*fp32", MT="*" + dt, POS="*fp32",
              stride_xb="i64"), dict(HAS_MT=mt, HAS_POS=mt, BLOCK_R=4, BLOCK_D=256))
    for bo, bs in ((64, 64), (128, 32)):
        build(K._index_sum_kernel, dict(G="*" + dt, IDX="*i64", OUT="*" + dt, REST="*fp32"),
              dict(WANT_REST=bo == 64, IEEE=dt == "fp32", UPCAST=False, BLOCK_O=bo, BLOCK_S=bs, BLOCK_D=64), 8)
build(K._bert_masking_kernel, dict(SEED="*i64", seed_val="i64", IDS="*i64", SPECIAL="*i8", OUT="*i64",
      LABELS="*i64", prob="fp32", replace_prob="fp32", random_prob="fp32"),
      dict(SEED_IN_MEMORY=True, HAS_SPECIAL=True, BLOCK=1024))
""")
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 2 + 12 + 27 + 8 + 1, out  # masking, gather_patches, masked_mse, token kernels, bert
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills)
    # bf16, p=16: images and predictions are read as 16-byte vectors, never 2 bytes at a time, and the patch
    # gather to MAE order goes through shared memory (as warp shuffles it would take 1024 per lane)
    loads = [[int(n) for n in line.split()[1:]] for line in out.splitlines() if line.startswith("loads ")]
    assert len(loads) == 10 and all(vec > 0 and scalar == 0 and shfl < 100 for vec, scalar, shfl in loads), out


# ----------------------------------------------------------------------------------------- GPU (real kernels)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_vitb_ops(dtype):
    """ViT-B/16, B=256, 224 px: every op and gradient against the official code on the real kernels."""
    dev = torch.device("cuda")
    B, C, p, L, D = 256, 3, 16, 196, 768
    g = torch.Generator(device=dev).manual_seed(1)
    m = mae.random_masking(B, L, 0.75, device=dev, generator=g)
    s = torch.randint(
        0, 1 << 62, (1,), dtype=torch.int64, device=dev, generator=torch.Generator(device=dev).manual_seed(1)
    )
    ref_m = pt.random_masking(s, B, L, 49, 1, L, dev)
    for a, b in zip(m, ref_m):
        assert torch.equal(a, b), "kernel and PyTorch Philox permutations differ"
    imgs = torch.randn(B, C, 224, 224, device=dev).to(dtype)
    assert torch.equal(mae.patchify(imgs, p), R.patchify_official(imgs, p))
    assert torch.equal(mae.gather_patches(imgs, m.ids_keep, p), gather(R.patchify_official(imgs, p), m.ids_keep))
    x = torch.randn(B, L, D, device=dev, dtype=dtype)
    a = leaf(x)
    out = mae.gather_tokens(a, m.ids_keep)
    assert torch.equal(out, gather(x, m.ids_keep))
    gk = torch.randn_like(out)
    out.backward(gk)
    assert torch.equal(a.grad, torch.zeros_like(x).scatter(1, m.ids_keep[:, :, None].expand(-1, -1, D), gk))
    xv, mt, pos = (
        torch.randn(B, 49, D, device=dev, dtype=dtype),
        torch.randn(1, 1, D, device=dev, dtype=dtype),
        torch.randn(1, L, D, device=dev, dtype=dtype),
    )
    xa, mta, posa = leaf(xv), leaf(mt), leaf(pos)
    xb, mtb, posb = leaf(xv, torch.float64), leaf(mt, torch.float64), leaf(pos, torch.float64)
    out = mae.unshuffle(xa, m.ids_restore, mta, posa)
    ref = R.unshuffle_official(xb, m.ids_restore, mtb, posb)
    assert_close(out, ref, tol(dtype, "cuda"), "unshuffle")
    gu = torch.randn(B, L, D, device=dev, dtype=dtype)
    out.backward(gu)
    ref.backward(gu.double())
    assert torch.equal(xa.grad, xb.grad.to(dtype)), "d x_visible must be an exact gather"
    assert_close(mta.grad, mtb.grad, tol(dtype, "cuda"), "d mask_token")
    assert_close(posa.grad, posb.grad, tol(dtype, "cuda"), "d pos")
    pred = torch.randn(B, L, p * p * C, device=dev, dtype=dtype)
    for norm in (True, False):
        pa, pb = leaf(pred), leaf(pred, torch.float64)
        loss = mae.masked_mse_loss(pa, imgs, m.mask, p, norm)
        ref = R.forward_loss_official(imgs.double(), pb, m.mask.double(), p, norm)
        assert_close(loss, ref, tol(dtype, "cuda"), "loss")
        loss.backward()
        ref.backward()
        assert_close(pa.grad, pb.grad, tol(dtype, "cuda"), "d pred")


@pytest.mark.gpu
def test_gpu_front_and_bad_ids():
    dev = torch.device("cuda")
    B, p, D = 64, 16, 768
    front = MaskedPatchEmbed(224, p, 3, D, pos_embed="learned").to(dev)
    imgs = torch.randn(B, 3, 224, 224, device=dev)
    m = mae.random_masking(B, 196, 0.75, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = front(imgs, masking=m)
        ref = mae.gather_tokens(front.embed_all(imgs), m.ids_keep)
    assert out.dtype == ref.dtype == torch.float32  # bf16 conv + fp32 pos, as the official front under AMP
    assert_close(out, ref, 2e-2, "front bf16 autocast")
    out32, _ = front(imgs, masking=m)
    assert_close(out32, mae.gather_tokens(front.embed_all(imgs), m.ids_keep), 5e-3, "front fp32 (cuDNN TF32)")
    bf = MaskedPatchEmbed(224, p, 3, D, pos_embed="learned").to(dev, torch.bfloat16)
    outb, _ = bf(imgs.bfloat16(), masking=m)
    assert outb.dtype == torch.bfloat16
    assert_close(outb, mae.gather_tokens(bf.embed_all(imgs.bfloat16()), m.ids_keep), 2e-2, "front bf16")
    # out-of-range ids on CUDA: no check (it would sync), no fault: NaN rows
    bad = m.ids_keep.clone()
    bad[0, 0] = 10_000
    got = mae.gather_tokens(torch.randn(B, 196, 8, device=dev), bad)
    assert torch.isnan(got[0, 0]).all() and torch.isfinite(got[1:]).all()
    assert torch.isnan(mae.gather_patches(imgs, bad, p)[0, 0]).all()
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_compile_and_block_masking():
    dev = torch.device("cuda", torch.cuda.current_device())
    m = mae.random_masking(32, 196, 0.6, device=dev, block_size=2)
    cm = m.mask.reshape(32, 7, 2, 7, 2)
    assert torch.equal(cm.amax((2, 4)), cm.amin((2, 4)))
    B, L, D, p = 8, 196, 64, 16
    imgs = torch.randn(B, 3, 224, 224, device=dev, dtype=torch.bfloat16)
    w = torch.randn(D, p * p * 3, device=dev, dtype=torch.bfloat16, requires_grad=True)
    mt = torch.randn(D, device=dev, dtype=torch.bfloat16, requires_grad=True)

    def step(imgs, w, mt):
        mm = mae.random_masking(B, L, 0.75, device=dev)
        v = mae.gather_patches(imgs, mm.ids_keep, p) @ w.t()
        full = mae.unshuffle(v, mm.ids_restore, mt)
        return mae.masked_mse_loss(full @ w, imgs, mm.mask, p)

    loss = torch.compile(step, fullgraph=True)(imgs, w, mt)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all() and torch.isfinite(mt.grad).all()
