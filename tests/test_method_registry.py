"""Adding a method is one class and one registry line: the trainer, the CLI and the step benchmark read
everything else from its traits."""

import json

import pytest
import torch
from torch import nn

import sslfast as sf
from sslfast import bench, cli
from sslfast.bench import methods as bench_methods
from sslfast.methods import METHODS, BenchStep, Method, register_method
from sslfast.train import ConfigError, PretrainConfig, resolve


class Toy(Method):
    """A toy ViT method: NT-Xent on a linear projection of two views."""

    name = "toy"
    preset = "simclr"
    RECIPE = dict(optimizer="sgd", lr=0.05, weight_decay=0.0, warmup_epochs=0, momentum=0.9)
    needs_vit = True
    default_backbone = {"small": "vit_micro", "paper": "vit_tiny"}
    min_batch_per_rank = 3
    bench_step = BenchStep(batch=48, image_size=32)  # on default_backbone["paper"]

    def __init__(self, backbone, *, gather_distributed=False):
        super().__init__(backbone, gather_distributed=gather_distributed)
        self.head = nn.Linear(self.feature_dim, 8)

    def forward(self, views):
        z1, z2 = (self.head(self.backbone(v)) for v in views[:2])
        return sf.nt_xent_loss(z1, z2, 0.5, gather_distributed=self.gather_distributed)


@pytest.fixture
def toy():
    register_method(Toy)  # the one registry line
    yield Toy
    del METHODS[Toy.name]


def test_traits_drive_the_config(toy):
    cfg = resolve(PretrainConfig(method="toy", out="unused"))
    assert cfg.backbone == "vit_micro" and cfg.optimizer == "sgd" and cfg.lr == 0.05
    with pytest.raises(ConfigError, match="ViT"):
        resolve(PretrainConfig(method="toy", backbone="resnet_tiny", out="unused"))
    with pytest.raises(ConfigError, match="at least 3 images per rank"):
        resolve(PretrainConfig(method="toy", batch_size=2, out="unused"))


def test_toy_method_pretrains_from_the_cli(toy, tmp_path):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "pretrain",
                "--method",
                "toy",
                "--epochs",
                "1",
                "--batch-size",
                "64",
                "--no-knn",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["config"]["method"] == "toy"
    assert metrics["config"]["backbone"] == "vit_micro"


def test_register_rejects_a_clash_and_a_non_method(toy):
    clash = type("Clash", (Method,), {"name": "toy"})
    with pytest.raises(ValueError, match="already registered"):
        register_method(clash)
    with pytest.raises(TypeError, match="Method subclass"):
        register_method(object)


def test_bench_step_case_derives_from_the_traits(toy, monkeypatch):
    assert ("toy", "vit_tiny", 48, 32) in bench_methods.cases()
    monkeypatch.setattr(bench, "REGISTRY", [])
    bench_methods.register_cases()
    names = [c.name for c in bench.REGISTRY if c.op == "step"]
    assert "toy vit_tiny B=48 32px" in names
    # the case's setup runs the toy's training step (here at a CPU size)
    st = bench_methods.step_setup("toy", "vit_micro", 6, 16, torch.device("cpu"), torch.float32)
    st.fused()
    st.reference()
    assert st.items == 6


def test_a_method_without_bench_step_has_no_case(toy, monkeypatch):
    monkeypatch.setattr(Toy, "bench_step", None)
    assert Toy.bench_case() is None
    assert "toy" not in [c[0] for c in bench_methods.cases()]


def test_bench_step_backbone_overrides_the_paper_default(toy, monkeypatch):
    monkeypatch.setattr(Toy, "bench_step", BenchStep(backbone="vit_small", batch=7))
    assert Toy.bench_case() == ("vit_small", 7, 224)


@pytest.mark.parametrize(
    "attrs, exc, match",
    [
        (dict(name="Toy2"), ValueError, "lower-case"),
        (dict(name=""), ValueError, "lower-case"),
        (dict(name="toy2", default_backbone={"small": "vit_micro"}), ValueError, "'paper'"),
        (dict(name="toy2", bench_step=(256, 224)), TypeError, "bench_step"),
    ],
)
def test_register_rejects_bad_traits(attrs, exc, match):
    cls = type("Bad", (Method,), attrs)
    with pytest.raises(exc, match=match):
        register_method(cls)
    assert attrs["name"] not in METHODS


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(batch=0), ValueError, "batch"),
        (dict(image_size=-3), ValueError, "image_size"),
        (dict(batch=2.0), TypeError, "batch"),
        (dict(batch=True), TypeError, "batch"),
        (dict(backbone=50), TypeError, "backbone"),
    ],
)
def test_bench_step_rejects_bad_values(kw, exc, match):
    with pytest.raises(exc, match=match):
        BenchStep(**kw)
