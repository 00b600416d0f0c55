"""Backbones and SSL methods: every method steps, learns on the digits, and a 2-process gloo step equals one
process on the whole batch."""

import pytest
import torch

from sslfast.data import SSLLoader
from sslfast.methods import METHODS, build_method
from sslfast.models import SyncBatchNorm, build_backbone, default_patch_size
from sslfast.models.resnet import resnet18
from sslfast.train import PretrainConfig, data_sources, preset_for, resolve, setup, train_step

from distributed_harness import run_ranks


def _cfg(method, **kw):
    kw.setdefault("batch_size", 16)
    kw.setdefault("epochs", 1)
    return resolve(PretrainConfig(method=method, out="unused", workers=1, **kw))


def _views(method, batch, seed=0):
    """Random views shaped as the method's preset makes them for its default small run (16 px)."""
    g = torch.Generator().manual_seed(seed)
    specs = preset_for(_cfg(method), METHODS[method]).expanded()
    return [torch.randn(batch, 3, v.size, v.size, generator=g) for v in specs]


# --------------------------------------------------------------------------------------------- backbones
def test_backbones_shapes():
    for name, size, dim in (
        ("resnet_tiny", 16, 128),
        ("resnet18", 32, 512),
        ("vit_micro", 16, 96),
        ("vit_tiny/4", 16, 192),
    ):
        net = build_backbone(name, image_size=size)
        assert net.num_features == dim
        assert net(torch.randn(2, 3, size, size)).shape == (2, dim)


def test_resnet_names_follow_torchvision():
    keys = set(resnet18(image_size=224).state_dict())
    assert {
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer4.1.bn2.weight",
        "layer2.0.downsample.0.weight",
    } <= keys
    assert not any(k.startswith("fc.") for k in keys)


def test_vit_masked_encoder_matches_full_forward(seed):
    """forward_masked keeps the visible tokens only; with the same blocks they equal the full model's tokens
    when attention cannot mix (depth 0), and `embed` at another size interpolates the position embedding."""
    net = build_backbone("vit_micro", image_size=16)
    x = torch.randn(3, 3, 16, 16)
    tokens, info = net.patch_embed(x, 0.5)
    full = net.embed(x)
    want = torch.gather(full[:, 1:], 1, info.ids_keep[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(tokens[:, 1:], want, rtol=1e-5, atol=1e-5)
    assert net.patch_size == default_patch_size(16) == 2
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 96)  # a DINO local crop
    with pytest.raises(ValueError, match="patch_size"):
        net(torch.randn(2, 3, 9, 9))


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet7")


def test_sync_batchnorm_single_process_is_batchnorm(seed):
    bn, ref = SyncBatchNorm(5), torch.nn.BatchNorm1d(5)
    x = torch.randn(7, 5) * 3 + 1
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)


# --------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_steps(name, precision):
    """Two optimizer steps with the method's recipe: finite losses, weights and teacher move."""
    cfg = _cfg(name, precision=precision)
    run = setup(cfg, steps_per_epoch=2, device="cpu")
    before = {
        k: v.clone()
        for k, v in run.method.state_dict().items()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    }
    losses = [train_step(run, _views(name, 16, seed=i)).item() for i in range(2)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    after = run.method.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("backbone.") for k in moved)
    if run.method.ema is not None:
        assert any(k.startswith("ema.teacher.") for k in moved), "the teacher did not follow the student"
        assert run.method.ema.step == 2
    assert run.method.global_step == 2


def test_hyperparameters_documented():
    for name, cls in METHODS.items():
        assert cls.__module__ and "arXiv" in (__import__(cls.__module__, fromlist=["x"]).__doc__ or ""), name
        recipe = cls.recipe("paper")
        assert recipe["optimizer"] in ("lars", "adamw", "sgd") and recipe["lr"] > 0, name


def test_paper_heads():
    """Spot-check head shapes against the papers (ResNet-50 features: 2048)."""
    bb = build_backbone("resnet50", image_size=224)
    assert build_method("simclr", bb).projector[-1].out_features == 128
    assert build_method("byol", bb).predictor[0].out_features == 4096
    assert build_method("barlowtwins", bb).projector[-1].out_features == 8192
    assert build_method("simsiam", bb).predictor[0].out_features == 512
    vit = build_backbone("vit_small", image_size=224)
    dino = build_method("dino", vit)
    assert dino.head.last_layer.weight.shape == (65536, 256)
    assert dino.criterion.center.shape == (1, 65536)
    mae = build_method("mae", build_backbone("vit_base", image_size=224))
    assert len(mae.decoder_blocks) == 8 and mae.decoder_embed.out_features == 512


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if cls.needs_vit))
def test_vit_only_methods_refuse_a_resnet(name):
    with pytest.raises(ValueError, match="ViT"):
        build_method(name, build_backbone("resnet_tiny", image_size=16), profile="small")


# Steps of the learning check, each method with its `short_run` overrides (e.g. a queue that fills within the
# first steps); the windows compared skip the first two steps.
LEARN_STEPS = 30
LEARN_BATCH = 128
# DINOv2's step (10 crops through the ViT, iBOT and KoLeo on top) costs several times a two-view method's; at 64
# images its loss still falls step after step (seed 0: 11.25 -> 10.61 between the compared windows).
LEARN_BATCH_OF = {"dinov2": 64}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_goes_down_on_digits(name):
    torch.manual_seed(0)
    batch = LEARN_BATCH_OF.get(name, LEARN_BATCH)
    cfg = _cfg(name, batch_size=batch, epochs=3, warmup_epochs=0.0)
    train, _ = data_sources(cfg)
    loader = SSLLoader(
        train,
        preset_for(cfg, METHODS[name]),
        batch,
        device="cpu",
        seed=0,
        num_workers=1,
        shard_id=0,
        num_shards=1,
    )
    run = setup(cfg, steps_per_epoch=len(loader), device="cpu", **METHODS[name].short_run)
    losses = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for views in loader:
            losses.append(train_step(run, views).item())
            if len(losses) == LEARN_STEPS:
                break
        if len(losses) == LEARN_STEPS:
            break
    first, last = sum(losses[2:10]) / 8, sum(losses[-8:]) / 8
    assert last < first, f"{name}: loss {first:.4f} -> {last:.4f}: {[round(v, 3) for v in losses]}"


# --------------------------------------------------------------------------------------------- distributed
# every method that declares a step on R ranks equal to one process on the whole batch (`exact_across_ranks`)
DIST_METHODS = sorted(name for name, cls in METHODS.items() if cls.exact_across_ranks)


def _one_step(name, world, views):
    cfg = _cfg(name, batch_size=8)
    run = setup(cfg, steps_per_epoch=4, device="cpu", world=world)
    train_step(run, views)
    return {k: v.clone() for k, v in run.method.state_dict().items() if isinstance(v, torch.Tensor)}


def _rank_fn(rank, world, batches):
    out = {}
    for name, views in batches.items():
        n = views[0].shape[0] // world
        out[name] = _one_step(name, world, [v[rank * n : (rank + 1) * n] for v in views])
    return out


@pytest.mark.slow
def test_gloo_two_ranks_equal_one_process_on_whole_batch():
    """DDP + gather_distributed losses + global BN: one step on 2 ranks (4 images each) gives the weights of
    one process stepping on all 8 images, for every method declaring `exact_across_ranks`."""
    assert len(DIST_METHODS) >= 4, DIST_METHODS  # the trait cannot silently empty the check
    batches = {name: _views(name, 8, seed=3) for name in DIST_METHODS}
    ranks = run_ranks(2, _rank_fn, batches, timeout=300)
    for name in DIST_METHODS:
        single = _one_step(name, 1, batches[name])
        for rank_state in ranks:
            for key, want in single.items():
                if key.endswith("num_batches_tracked"):
                    continue
                torch.testing.assert_close(
                    rank_state[name][key], want, rtol=2e-4, atol=2e-5, msg=lambda m: f"{name} {key}: {m}"
                )
