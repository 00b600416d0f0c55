"""Adding a method is one class and one registry line: the trainer reads everything else from its traits."""
import json

import pytest
from torch import nn

import sslfast as sf
from sslfast import cli
from sslfast.methods import METHODS, Method, register_method
from sslfast.train import ConfigError, PretrainConfig, resolve


class Toy(Method):
    """A toy ViT method: NT-Xent on a linear projection of two views."""

    name = "toy"
    preset = "simclr"
    RECIPE = dict(optimizer="sgd", lr=0.05, weight_decay=0.0, warmup_epochs=0, momentum=0.9)
    needs_vit = True
    default_backbone = {"small": "vit_micro", "paper": "vit_tiny"}
    min_batch_per_rank = 3

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
    assert cli.main(["pretrain", "--method", "toy", "--epochs", "1", "--batch-size", "64", "--no-knn",
                     "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["config"]["method"] == "toy"
    assert metrics["config"]["backbone"] == "vit_micro"


def test_register_rejects_a_clash_and_a_non_method(toy):
    clash = type("Clash", (Method,), {"name": "toy"})
    with pytest.raises(ValueError, match="already registered"):
        register_method(clash)
    with pytest.raises(TypeError, match="Method subclass"):
        register_method(object)
