"""DINOv2: iBOT block masks, the ViT mask-token path, the loss terms against direct float64 computations, the
layer-wise lr groups, training steps and a short `sslfast pretrain` run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sslfast import cli
from sslfast.methods import METHODS, build_method
from sslfast.data.ibot_masks import block_mask, ibot_masks
from sslfast.methods.dinov2 import DINOv2
from sslfast.models import build_backbone
from sslfast.train import PretrainConfig, resolve, setup, train_step


# --------------------------------------------------------------------------------------------- masks
def _in_blocks(masks: torch.Tensor) -> float:
    """The fraction of the masked patches of masks [n, gh, gw] that have a masked 4-neighbour."""
    m = F.pad(masks, (1, 1, 1, 1))
    neighbour = m[:, :-2, 1:-1] | m[:, 2:, 1:-1] | m[:, 1:-1, :-2] | m[:, 1:-1, 2:]
    return ((neighbour & masks).sum() / masks.sum()).item()


@pytest.mark.parametrize("grid", [(8, 8), (7, 9)])
def test_ibot_masks_ratios_blocks_and_half_unmasked(grid, seed):
    n, L = 301, grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    masks = ibot_masks(n, grid, generator=g)
    assert masks.shape == (n, L) and masks.dtype == torch.bool
    counts = masks.sum(1)
    masked = counts[counts > 0].double() / L
    assert len(masked) == int(n * 0.5)  # DINOv2's collate masks ⌊n·p⌋ crops, the others not at all
    # per image ⌊L·r⌋ patches with r ∈ [0.1, 0.5] (stratified), the generator may stop a few short
    assert masked.max() <= 0.5 and masked.min() >= (math.floor(0.1 * L) - 2) / L
    assert masked.min() < 0.2 and masked.max() > 0.4 and abs(masked.mean().item() - 0.3) < 0.03
    # blocks: rectangles of >= 2 patches (a 1-patch one only to fill the last few patches), so nearly every
    # masked patch has a masked 4-neighbour; the same counts scattered at random: ~3/4 of them
    grids = masks.view(n, *grid)
    scattered = torch.stack([m.flatten()[torch.randperm(L, generator=g)].view(grid) for m in grids])
    assert _in_blocks(grids) > 0.97 and _in_blocks(scattered) < 0.85
    # the same generator state gives the same masks; other probabilities
    assert torch.equal(
        ibot_masks(n, grid, generator=torch.Generator().manual_seed(seed)),
        ibot_masks(n, grid, generator=torch.Generator().manual_seed(seed)),
    )
    assert (ibot_masks(n, grid, mask_sample_probability=0.3, generator=g).sum(1) > 0).sum() == int(n * 0.3)
    assert not ibot_masks(n, grid, mask_sample_probability=0.0, generator=g).any()


def test_block_mask_reaches_its_target_with_rectangles():
    import random

    rng = random.Random(5)
    reached = 0
    for target in range(4, 33):
        m = block_mask((8, 8), target, rng, max_num_patches=32)
        assert m.sum() <= target
        reached += int(m.sum() == target)
    assert reached >= 25
    one = block_mask((8, 8), 4, random.Random(1), max_num_patches=4)  # a single rectangle: its bounding box
    rows, cols = one.any(1).nonzero().flatten(), one.any(0).nonzero().flatten()
    assert one[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_ibot_masks_bad_arguments():
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        ibot_masks(4, (4, 4), mask_ratio_min_max=(0.5, 0.1))
    with pytest.raises(ValueError, match="mask_sample_probability"):
        ibot_masks(4, (4, 4), mask_sample_probability=1.5)


# --------------------------------------------------------------------------------------------- ViT mask token
@pytest.mark.parametrize("pos_embed,size", [("sincos", 16), ("learned", 10)])
def test_vit_mask_token_path(pos_embed, size, seed):
    """Masked positions hold mask_token + pos, the others are bit-identical to the unmasked embedding (at the
    model's size and at another size with an interpolated position embedding); the token gets the gradient of
    the masked positions."""
    net = build_backbone("vit_micro", image_size=16, pos_embed=pos_embed)
    x = torch.randn(3, 3, size, size)
    before = net(x)
    assert "mask_token" not in net.state_dict()
    token = net.init_mask_token()
    assert net.init_mask_token() is token and "mask_token" in net.state_dict()
    with torch.no_grad():
        token.normal_()
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)  # calls without masks are unchanged
    L = (size // net.patch_size) ** 2
    masks = torch.rand(3, L) < 0.4
    masks[0] = False
    plain, masked = net.embed(x), net.embed(x, masks=masks)
    pos = net._pos_embed((size // net.patch_size,) * 2)[0]
    assert torch.equal(masked[:, 0], plain[:, 0])
    assert torch.equal(masked[:, 1:][~masks], plain[:, 1:][~masks])
    want = (token[0, 0] + pos)[None].expand(3, -1, -1)[masks]
    torch.testing.assert_close(masked[:, 1:][masks], want, rtol=0, atol=0)
    r = torch.randn_like(masked)
    (masked * r).sum().backward()
    torch.testing.assert_close(token.grad[0, 0], r[:, 1:][masks].sum(0), rtol=1e-5, atol=1e-5)


def test_vit_mask_token_errors():
    net = build_backbone("vit_micro", image_size=16)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="init_mask_token"):
        net.embed(x, masks=torch.zeros(2, 64, dtype=torch.bool))
    net.init_mask_token()
    with pytest.raises(TypeError, match="masks"):
        net.embed(x, masks=torch.zeros(2, 64))
    with pytest.raises(ValueError, match=r"masks must be \[B, L\]"):
        net.embed(x, masks=torch.zeros(2, 63, dtype=torch.bool))


# --------------------------------------------------------------------------------------------- loss terms
def _sinkhorn64(logits, temp, n_iters=3):
    """DINOv2's SinkhornKnoppTeacher.sinkhorn_knopp_teacher, in float64."""
    Q = torch.exp(logits.double() / temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(n_iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def _ce(targets, logits, temp=0.1):
    return -(targets * F.log_softmax(logits / temp, dim=-1)).sum(-1)


def _koleo64(x, eps=1e-8):
    x = F.normalize(x.double(), eps=eps)
    sim = x @ x.t()
    sim.fill_diagonal_(-2.0)
    nn = sim.argmax(1)
    return -torch.log((x - x[nn] + 1e-8).norm(dim=-1) + eps).mean()


def _small(**kw):
    torch.manual_seed(0)
    return build_method("dinov2", build_backbone("vit_micro", image_size=16), profile="small", **kw)


def _views(B, locals_=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 16, 16, generator=g, dtype=dtype) for _ in range(2)] + [
        torch.randn(B, 3, 6, 6, generator=g, dtype=dtype) for _ in range(locals_)
    ]


@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_loss_is_the_weighted_sum_of_direct_terms(centering, fused_head):
    """Every term recomputed in float64 from the student / teacher networks: the DINO term over the 2(V − 1)
    cross-view pairs, iBOT over the masked tokens, KoLeo per global crop; total = 1·dino + 1·ibot + 0.1·koleo;
    the teacher temperature follows DINOv2's per-step warm-up; on the fused and the materialized head."""
    m = _small(centering=centering, warmup_teacher_temp_epochs=3, fused_head=fused_head).double()
    m.configure(total_steps=40, steps_per_epoch=10)
    m.global_step = 17
    temp = 0.04 + 17 * (0.07 - 0.04) / 29
    assert m.teacher_temperature() == pytest.approx(temp)
    if centering == "centering":
        with torch.no_grad():
            m.dino_center.normal_()
            m.ibot_center.normal_()
        centers = (m.dino_center.clone(), m.ibot_center.clone())
    B, N = 5, 3
    views = _views(B, N, dtype=torch.float64)
    masks = torch.zeros(2 * B, 64, dtype=torch.bool)
    masks[1, [3, 4, 11, 12]] = True
    masks[6, 20:34] = True
    masks[7, [0, 63]] = True
    out = m.compute(views, masks=masks)

    bb, teacher = m.backbone, m.ema.teacher
    glob = torch.cat(views[:2])
    with torch.no_grad():
        t_tok = teacher[0].forward_tokens(teacher[0].embed(glob))
        t_cls_logits = teacher[1](t_tok[:, 0])
        t_patch_logits = teacher[1](t_tok[:, 1:][masks])
    if centering == "sinkhorn_knopp":
        q = _sinkhorn64(t_cls_logits, temp)
        q_ibot = _sinkhorn64(t_patch_logits, temp)
    else:
        q = F.softmax((t_cls_logits - centers[0]) / temp, -1)
        q_ibot = F.softmax((t_patch_logits - centers[1]) / temp, -1)
        torch.testing.assert_close(m.dino_center, 0.9 * centers[0] + 0.1 * t_cls_logits.mean(0, keepdim=True))
        torch.testing.assert_close(m.ibot_center, 0.9 * centers[1] + 0.1 * t_patch_logits.mean(0, keepdim=True))
    torch.testing.assert_close(out.teacher_dino, q)
    torch.testing.assert_close(out.teacher_ibot, q_ibot)

    s_tok = bb.forward_tokens(bb.embed(glob, masks=masks))
    torch.testing.assert_close(out.student_cls, s_tok[:, 0], rtol=0, atol=0)
    crops_cls = torch.cat([s_tok[:, 0]] + [bb.forward_tokens(bb.embed(v))[:, 0] for v in views[2:]])
    head = m.dino_head
    student_logits = head(crops_cls).view(2 + N, B, -1)  # the materialized head output
    W = F.normalize(head.last_layer.weight, dim=1)
    torch.testing.assert_close(out.dino_feats @ out.dino_prototypes.t(), student_logits.flatten(0, 1))

    qs = q.view(2, B, -1)
    pairs = [_ce(qs[g], student_logits[v]).mean() for v in range(2 + N) for g in range(2) if g != v]
    assert len(pairs) == 2 * (2 + N - 1)
    dino = torch.stack(pairs).mean()
    s_patch_logits = F.linear(F.normalize(head.mlp(s_tok[:, 1:][masks]), dim=-1), W)
    torch.testing.assert_close(out.ibot_feats @ out.ibot_prototypes.t(), s_patch_logits)
    assert (out.ibot_logits is None) == fused_head
    if not fused_head:
        torch.testing.assert_close(out.ibot_logits, s_patch_logits)
    ce_tok = _ce(q_ibot, s_patch_logits)
    image_of_token = masks.nonzero()[:, 0]
    per_image = torch.zeros(2 * B, dtype=torch.float64).index_add_(0, image_of_token, ce_tok)
    ibot = (per_image / masks.sum(1).clamp(min=1)).sum() / (2 * B)
    koleo = sum(_koleo64(c) for c in s_tok[:, 0].chunk(2))

    torch.testing.assert_close(out.terms["dino"], dino)
    torch.testing.assert_close(out.terms["ibot"], ibot)
    torch.testing.assert_close(out.terms["koleo"], koleo)
    torch.testing.assert_close(out.loss, dino + ibot + 0.1 * koleo)
    # gradients agree with the materialized computation too (prototype_cross_entropy's fused backward)
    params = [bb.mask_token, head.last_layer.weight, bb.blocks[0].attn.qkv.weight]
    got = torch.autograd.grad(out.loss, params)
    want = torch.autograd.grad(dino + ibot + 0.1 * koleo, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_loss_weights_and_separate_ibot_head():
    m = _small(ibot_separate_head=True, dino_loss_weight=0.5, ibot_loss_weight=2.0, koleo_loss_weight=0.0)
    assert m.ibot_head is not None and len(m.ema.teacher) == 3
    out = m.compute(_views(4))
    assert set(out.terms) == {"dino", "ibot"} and out.ibot_prototypes.shape == m.ibot_head.last_layer.weight.shape
    torch.testing.assert_close(out.loss, 0.5 * out.terms["dino"] + 2.0 * out.terms["ibot"])
    out.loss.backward()
    assert m.ibot_head.mlp[0].weight.grad.abs().sum() > 0 and m.backbone.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
@pytest.mark.parametrize("separate", [False, True])
def test_fused_head_equals_materialized(centering, separate, seed):
    """float64, two copies of one model (fused_head True / False), 3 steps with fresh masks: the same terms,
    centers, and gradients of every parameter; no differentiable [M, K] or [V·B, K] tensor saved when fused;
    the same state_dict keys."""
    import copy

    fused = _small(centering=centering, ibot_separate_head=separate).double()
    plain = copy.deepcopy(fused)
    plain.fused_head = False
    assert fused.fused_head and fused.state_dict().keys() == plain.state_dict().keys()
    if centering == "centering":
        with torch.no_grad():
            for c in (fused.dino_center, fused.ibot_center, plain.dino_center, plain.ibot_center):
                c.copy_(torch.arange(c.shape[1], dtype=torch.float64).sin())
    B, K = 5, fused.dino_head.last_layer.weight.shape[0]
    for step in range(3):
        views = _views(B, 2, seed=seed + step, dtype=torch.float64)
        masks = ibot_masks(2 * B, (8, 8), generator=torch.Generator().manual_seed(seed + step))
        outs, grads = [], []
        for m in (fused, plain):
            m.zero_grad(set_to_none=True)
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                out = m.compute(views, masks=masks)
            big = [t.shape for t in saved if t.shape[-1:] == (K,) and t.requires_grad and t.dim() == 2]
            assert (big == []) == m.fused_head, big
            out.loss.backward()
            outs.append(out)
            grads.append({n: p.grad for n, p in m.named_parameters()})
        what = f"step {step}, {centering}, separate {separate}, seed {seed}"
        assert outs[0].terms.keys() == outs[1].terms.keys() == {"dino", "ibot", "koleo"}, what
        for k in outs[1].terms:
            torch.testing.assert_close(outs[0].terms[k], outs[1].terms[k], rtol=1e-12, atol=1e-12, msg=what)
        torch.testing.assert_close(outs[0].teacher_ibot, outs[1].teacher_ibot, rtol=1e-10, atol=1e-12, msg=what)
        if centering == "centering":
            torch.testing.assert_close(fused.dino_center, plain.dino_center, rtol=1e-12, atol=1e-12, msg=what)
            torch.testing.assert_close(fused.ibot_center, plain.ibot_center, rtol=1e-12, atol=1e-12, msg=what)
        for name, g in grads[1].items():
            assert (grads[0][name] is None) == (g is None), name
            if g is not None:
                torch.testing.assert_close(
                    grads[0][name], g, rtol=1e-9, atol=1e-13, msg=lambda msg, name=name: f"d {name}, {what}: {msg}"
                )
        assert grads[0][("ibot_head" if separate else "dino_head") + ".last_layer.weight"].abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(TypeError, match="fused_head"):
        _small(fused_head="yes")
    with pytest.raises(ValueError, match="ViT"):
        build_method("dinov2", build_backbone("resnet_tiny", image_size=16), profile="small")
    with pytest.raises(ValueError, match="centering"):
        _small(centering="mean")
    with pytest.raises(ValueError, match="layerwise_decay"):
        _small(layerwise_decay=0.0)
    with pytest.raises(ValueError, match="koleo_loss_weight"):
        _small(koleo_loss_weight=-1.0)
    with pytest.raises(ValueError, match="2 global crops must have one shape"):
        _small()([torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)])


# --------------------------------------------------------------------------------------------- recipe / groups
def test_traits_recipe_and_paper_heads():
    cls = METHODS["dinov2"]
    assert cls is DINOv2 and cls.needs_vit and cls.default_backbone == {"small": "vit_micro", "paper": "vit_small"}
    recipe = cls.recipe("paper")
    assert recipe["optimizer"] == "adamw" and recipe["betas"] == (0.9, 0.999) and recipe["warmup_epochs"] == 10
    assert recipe["lr"] * 1024 / 256 == pytest.approx(0.004 * math.sqrt(1024 / 1024))  # DINOv2's lr at B = 1024
    m = build_method("dinov2", build_backbone("vit_small", image_size=224))
    assert m.dino_head.last_layer.weight.shape == (65536, 256) and m.dino_head.mlp[0].out_features == 2048
    assert m.ibot_head is None and m.ema.base_momentum == 0.992 and m.teacher_temp == 0.07
    assert m.loss_weights == dict(dino=1.0, ibot=1.0, koleo=0.1)


def test_layerwise_lr_groups():
    m = _small()
    n = len(m.backbone.blocks)
    scale = {id(p): g["lr_scale"] for g in m.param_groups() for p in g["params"]}
    wd = {id(p): g["weight_decay_scale"] for g in m.param_groups() for p in g["params"]}
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert len(scale) == sum(len(g["params"]) for g in m.param_groups()) == len(trainable)
    bb = m.backbone
    assert scale[id(bb.patch_embed.proj.weight)] == pytest.approx(0.9 ** (n + 1) * 0.2)
    assert scale[id(bb.mask_token)] == scale[id(bb.patch_embed.cls_token)] == pytest.approx(0.9 ** (n + 1))
    for i, blk in enumerate(bb.blocks):
        assert scale[id(blk.mlp.fc1.weight)] == scale[id(blk.norm1.bias)] == pytest.approx(0.9 ** (n - i))
    assert scale[id(bb.norm.weight)] == scale[id(m.dino_head.last_layer.weight)] == 1.0
    assert wd[id(bb.blocks[0].norm1.weight)] == wd[id(m.dino_head.mlp[0].bias)] == 0.0
    assert wd[id(bb.mask_token)] == wd[id(m.dino_head.mlp[0].weight)] == 1.0
    flat = _small(layerwise_decay=1.0, patch_embed_lr_mult=1.0)
    assert {g["lr_scale"] for g in flat.param_groups()} == {1.0}


def _cfg(**kw):
    return resolve(PretrainConfig(method="dinov2", out="unused", workers=1, **kw))


def test_steps_move_weights_and_teacher_last_layer_frozen_first_epoch():
    cfg = _cfg(batch_size=8, epochs=2)
    assert cfg.backbone == "vit_micro"
    run = setup(cfg, steps_per_epoch=2, device="cpu")
    m = run.method
    lr_of = {id(p): g["lr"] for g in run.optimizer.param_groups for p in g["params"]}
    ratio = lr_of[id(m.backbone.patch_embed.proj.weight)] / lr_of[id(m.dino_head.last_layer.weight)]
    assert ratio == pytest.approx(0.9 ** (len(m.backbone.blocks) + 1) * 0.2)  # the trainer applies lr_scale

    def state():
        return {
            k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor) and v.is_floating_point()
        }

    before = state()
    for i in range(2):
        assert torch.isfinite(train_step(run, _views(8, 2, seed=i)))
    after = state()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"backbone.mask_token", "backbone.blocks.0.attn.qkv.weight", "dino_head.mlp.0.weight"} <= moved
    assert any(k.startswith("ema.teacher.0.") for k in moved) and any(k.startswith("ema.teacher.1.") for k in moved)
    assert "dino_head.last_layer.weight" not in moved  # frozen during the first epoch
    train_step(run, _views(8, 2, seed=5))
    assert not torch.equal(m.dino_head.last_layer.weight, after["dino_head.last_layer.weight"])
    assert m.ema.step == 3 and m.global_step == 3


def test_pretrain_cli_runs(tmp_path):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "pretrain",
                "--method",
                "dinov2",
                "--epochs",
                "1",
                "--batch-size",
                "256",
                "--no-knn",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["config"]["method"] == "dinov2"
    assert metrics["config"]["backbone"] == "vit_micro"
