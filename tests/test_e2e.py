"""`sslfast bench --ops e2e` (whole steps from JPEG files, per loader and step mode) and the step modes of
`sslfast pretrain` (`--compile`, `--cuda-graph`)."""

import dataclasses
import json
import os

import pytest
import torch
from PIL import Image

from sslfast import cli
from sslfast.bench import e2e
from sslfast.methods import METHODS
from sslfast.train import PretrainConfig, resolve, setup
from sslfast.train import config as C
from sslfast.train.step import forward_backward, optimizer_step, train_step
from step_helpers import small_config, step_batches


def _exit(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr().err


def test_bench_e2e_cpu_prints_every_row_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "e2e.json"
    assert (
        cli.main(
            [
                "bench",
                "--ops",
                "e2e",
                "--device",
                "cpu",
                "--e2e-images",
                "7:33x27",
                "--e2e-batch",
                "3",
                "--e2e-image-size",
                "16",
                "--e2e-steps",
                "1",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    data = json.load(open(out))
    rows = {r["case"]: r for r in data["rows"]}
    assert list(rows) == [name for name, *_ in e2e.ROWS]
    for name in rows:
        assert name in printed
    # no CUDA here: DALI's mixed decode, compile and the captured step are reported, not dropped
    assert "CUDA device" in rows["dali + fused"]["unavailable"]
    assert rows["native + fused + compile"]["unavailable"] == e2e.COMPILE_NOT_ON_CPU
    assert rows["native + fused + cuda-graph"]["unavailable"] == "--cuda-graph needs a CUDA device"
    assert printed.count("unavailable: ") == 3
    for name, row in rows.items():
        if "unavailable" in row:
            continue
        assert row["images_per_s"] > 0 and row["batch"] == 3
        split = row["split_ms"]
        assert set(split) == {"data_wait", "fwd_bwd", "opt_ema", "other"}
        assert split["fwd_bwd"] > 0 and split["opt_ema"] > 0 and split["data_wait"] >= 0
        assert row["split_step_ms"] == pytest.approx(sum(split.values()))
    assert rows["step only (device batches)"]["split_ms"]["data_wait"] == 0
    assert rows["torch + reference"]["backend"] == "reference" and rows["torch + reference"]["loader"] == "torch"
    # the generated set: the count and size asked for, reused by the next run
    folder = rows["torch + fused"]["data"]
    jpegs = sorted(f for f in os.listdir(folder) if f.endswith(".jpg"))
    assert len(jpegs) == 7 and Image.open(os.path.join(folder, jpegs[0])).size == (33, 27)
    assert e2e.jpeg_set(7, (33, 27)) == folder


@pytest.mark.parametrize("spec", ["0", "12:40", "x", "5:4x4"])
def test_bench_e2e_bad_image_spec_is_one_line(spec, capsys):
    code, err = _exit(capsys, ["bench", "--ops", "e2e", "--device", "cpu", "--e2e-images", spec])
    assert code == 2 and "--e2e-images" in err and err.count("\n") == 1


def test_bench_e2e_runs_alone(capsys):
    code, err = _exit(capsys, ["bench", "--ops", "e2e", "infonce", "--device", "cpu"])
    assert code == 2 and "--ops e2e runs alone" in err


def test_cuda_graph_refused_on_cpu(tmp_path, capsys):
    code, err = _exit(capsys, ["pretrain", "--cuda-graph", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert code == 2 and err.count("\n") == 1 and "--cuda-graph needs a CUDA device" in err
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compiled_step_equals_the_eager_step(name, seed, monkeypatch):
    """--compile on a CPU, every method: the compiled method (dynamo + AOT autograd through the sslfast custom ops;
    the `aot_eager` backend stands in for inductor, whose C++ compile takes a minute here) trains like the eager
    one: the same losses after two steps, to fp32 rounding, and the same weights, to fp32 rounding plus what AdamW
    makes of it (a parameter whose gradient is zero in exact arithmetic, e.g. an attention key bias, gets
    rounding noise that AdamW turns into updates of up to lr per step)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="aot_eager"))
    torch._dynamo.reset()
    cfg = small_config(name)
    batches = step_batches(cfg, 2)
    eager = setup(cfg, steps_per_epoch=3, device="cpu")
    compiled = setup(dataclasses.replace(cfg, compile=True), steps_per_epoch=3, device="cpu")
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    lrs = []
    for views in batches:
        lrs.append(max(g["lr"] for g in eager.optimizer.param_groups))
        torch.manual_seed(seed)
        want = train_step(eager, views)
        torch.manual_seed(seed)
        torch.testing.assert_close(train_step(compiled, views), want, rtol=1e-5, atol=1e-6, msg=name)
    drift = 2 * sum(lrs) if cfg.optimizer == "adamw" else 0.0
    for (key, pa), pb in zip(compiled.method.named_parameters(), eager.method.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6 + drift, msg=f"{name}: {key}")


def test_step_modes_on_cuda(monkeypatch):
    """On a CUDA device (faked: resolve only) --compile and --cuda-graph are accepted; --cuda-graph is refused,
    with the reason, beside --compile, on several ranks, and for a method that declares a `graph_refusal`."""
    monkeypatch.setattr(C, "_on_cuda", lambda device: True)
    assert resolve(PretrainConfig(compile=True)).compile is True
    assert resolve(PretrainConfig(cuda_graph=True)).cuda_graph is True
    with pytest.raises(C.ConfigError, match="--cuda-graph and --compile exclude each other"):
        resolve(PretrainConfig(cuda_graph=True, compile=True))
    with pytest.raises(C.ConfigError, match="--cuda-graph captures the step of one process"):
        resolve(PretrainConfig(cuda_graph=True, batch_size=8), world=2)
    with pytest.raises(C.ConfigError, match="--cuda-graph: dino's teacher temperature"):
        resolve(PretrainConfig(method="dino", cuda_graph=True))
    with pytest.raises(C.ConfigError, match="--compile must be True or False"):
        resolve(PretrainConfig(compile="yes"))


def test_compile_wraps_the_method_forward():
    cfg = resolve(PretrainConfig(batch_size=8, epochs=1, device="cpu"))
    run = setup(dataclasses.replace(cfg, compile=True), steps_per_epoch=2, device="cpu")
    assert isinstance(run.model, torch._dynamo.eval_frame.OptimizedModule) and run.model._orig_mod is run.method
    assert setup(cfg, steps_per_epoch=2, device="cpu").model is not None


def test_split_phases_are_the_step(seed):
    """forward_backward + optimizer_step (the bench's split pass) is train_step: same loss, same weights."""
    cfg = resolve(PretrainConfig(batch_size=6, epochs=1, image_size=16, device="cpu"))
    views = [torch.randn(6, 3, 16, 16) for _ in range(2)]
    a, b = setup(cfg, steps_per_epoch=3, device="cpu"), setup(cfg, steps_per_epoch=3, device="cpu")
    for _ in range(2):
        la = train_step(a, views)
        lb = forward_backward(b, views).detach()
        optimizer_step(b)
        torch.testing.assert_close(la, lb, rtol=0, atol=0)
    for pa, pb in zip(a.method.parameters(), b.method.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert a.method.global_step == b.method.global_step == 2
