"""`sslfast pretrain` / `sslfast eval`: the default job, exact resume, NaN stop, image folders, bad arguments."""

import json
import os

import numpy as np
import pytest
import torch

from sslfast import cli
from sslfast.methods.simclr import SimCLR

PNG = b"\x89PNG\r\n\x1a\n"

# Measured with the default command (seed 0, 40 epochs, 27 s on 2 CPU cores): pretrained 94.2% vs random init 63.2%
# on the 359 held-out digits. The assertion leaves room for other CPUs' floating-point differences.
DEFAULT_MARGIN = 0.15


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_default_pretrain_beats_random_init(tmp_path, capsys):
    """The README's command, as is (only the run directory moved): SimCLR on the embedded digits."""
    assert cli.main(["pretrain", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    knn = metrics["knn"]
    assert metrics["finished"] and metrics["config"]["method"] == "simclr"
    assert knn["pretrained"] >= knn["random_init"] + DEFAULT_MARGIN, knn
    out = capsys.readouterr().out
    assert "kNN accuracy" in out and "random init" in out
    assert _is_png(tmp_path / "loss_curve.png")
    ckpt = _load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == metrics["config"]["epochs"]
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


SMALL_RUN = ["--epochs", "2", "--batch-size", "128", "--no-knn", "--no-progress"]


@pytest.mark.parametrize("method", ["byol", "mocov2", "dino"])
def test_resume_is_exact(tmp_path, method):
    """Stopped after epoch 1 and resumed == uninterrupted: weights, teacher, queue / center, optimizer."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["pretrain", "--method", method, *SMALL_RUN]
    assert cli.main([*args, "--out", str(full)]) == 0
    assert cli.main([*args, "--out", str(part), "--stop-after", "1"]) == 0
    assert _load(part / "checkpoint.pt")["epoch"] == 1
    assert cli.main(["pretrain", "--resume", "--out", str(part), "--no-progress"]) == 0
    a, b = _load(full / "checkpoint.pt"), _load(part / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["method"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["method"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][pid][name])), name
    assert a["history"]["step_loss"] == b["history"]["step_loss"]


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    forward = SimCLR.forward
    steps_per_epoch = 1438 // 128

    def poisoned(self, views):
        loss = forward(self, views)
        return loss * float("nan") if self.global_step == steps_per_epoch + 3 else loss

    monkeypatch.setattr(SimCLR, "forward", poisoned)
    with pytest.raises(SystemExit) as exc:
        cli.main(["pretrain", *SMALL_RUN, "--out", str(tmp_path)])
    assert exc.value.code == 3
    err = capsys.readouterr().err
    assert "loss became nan at epoch 2, step 4" in err and "last good checkpoint" in err
    ckpt = _load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    assert all(
        torch.isfinite(v).all()
        for v in ckpt["method"].values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    assert not (tmp_path / "metrics.json").exists()


def test_mae_reconstructions_and_eval(tmp_path, capsys):
    assert (
        cli.main(
            [
                "pretrain",
                "--method",
                "mae",
                "--epochs",
                "1",
                "--batch-size",
                "128",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert _is_png(tmp_path / "reconstructions.png")
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert (
        cli.main(["eval", "--checkpoint", str(tmp_path), "--epochs", "1", "--random-init", "--json", str(report)]) == 0
    )
    out = capsys.readouterr().out
    assert "knn" in out and "linear" in out and "finetune" in out
    acc = json.loads(report.read_text())["accuracy"]
    assert set(acc) == {"pretrained", "random_init"}
    for res in acc.values():
        assert set(res) == {"knn", "linear", "finetune"} and all(0.0 <= v <= 1.0 for v in res.values())
    assert acc["pretrained"]["knn"] > 0.3  # ten classes: far above chance after one epoch


def test_image_folder(tmp_path):
    from sslfast.data.synthetic import write_jpeg_folder

    data = tmp_path / "images"
    write_jpeg_folder(data, 48, size=(40, 30), classes=3)
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "pretrain",
                "--data",
                str(data),
                "--backbone",
                "resnet_tiny",
                "--image-size",
                "16",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["profile"] == "paper" and metrics["knn"]["test_images"] == 9
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--protocol", "knn", "linear"]) == 0


@pytest.mark.parametrize(
    "argv,env,match",
    [
        (["pretrain", "--method", "simclrr"], {}, "invalid choice: 'simclrr'"),
        (["pretrain", "--data", "/no/such/folder"], {}, "--data: '/no/such/folder' is not a folder"),
        (["pretrain", "--batch-size", "2"], {"WORLD_SIZE": "4"}, "smaller than the world size 4"),
        (["pretrain", "--batch-size", "6"], {"WORLD_SIZE": "4"}, "divisible by the world size 4"),
        (["pretrain", "--method", "mae", "--backbone", "resnet18"], {}, "mae needs a ViT backbone"),
        (["pretrain", "--backbone", "resnet7", "--epochs", "1"], {}, "unknown backbone 'resnet7'"),
        (["pretrain", "--epochs", "0"], {}, "--epochs must be a positive integer"),
        (["pretrain", "--lr", "-1"], {}, "--lr must be a finite number > 0"),
        (["pretrain", "--batch-size", "4096", "--epochs", "1"], {}, "--batch-size 4096"),
        (["pretrain", "--resume"], {}, "--resume: no checkpoint"),
        (["eval", "--checkpoint", "/no/such/checkpoint.pt"], {}, "--checkpoint: no checkpoint"),
    ],
)
def test_bad_arguments(argv, env, match, tmp_path, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if argv[0] == "pretrain":
        argv = [*argv, "--out", str(tmp_path / "run"), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_bench_subcommand_still_parses(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--no-reference" in capsys.readouterr().out


def test_plots_are_pngs_of_the_values(tmp_path):
    """The loss curve (matplotlib) and the image grid (Pillow) are PNGs; the grid holds the images, upscaled."""
    from PIL import Image

    from sslfast._plot import line_plot, save_image_grid

    line_plot([3.0, 2.5, 2.7, 1.0], tmp_path / "curve.png")
    rows = [torch.rand(3, 1, 4, 4), torch.rand(2, 3, 4, 4)]
    save_image_grid(rows, tmp_path / "grid.png", scale=2, gap=1)
    assert _is_png(tmp_path / "curve.png") and _is_png(tmp_path / "grid.png")
    grid = torch.from_numpy(np.array(Image.open(tmp_path / "grid.png").convert("RGB"))).float() / 255
    assert grid.shape == (2 * (8 + 1) + 1, 3 * (8 + 1) + 1, 3)
    second = grid[1 + 9 : 1 + 9 + 8 : 2, 1 + 9 : 1 + 9 + 8 : 2]  # row 1, image 1, every other (upscaled) pixel
    torch.testing.assert_close(second, rows[1][1].permute(1, 2, 0), atol=1 / 255, rtol=0)
