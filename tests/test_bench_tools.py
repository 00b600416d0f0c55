"""The measurement scripts in benchmarks/ run (each in its own process: host_overhead.py stubs Triton's
interpreter for the whole process)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, interpret=False):
    env = {k: v for k, v in os.environ.items() if k not in ("SSLFAST_BACKEND", "TRITON_INTERPRET")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_host_overhead_counts_launches_and_aten_ops(tmp_path):
    out = tmp_path / "host.json"
    _run("host_overhead.py", "--repeat", "3", "--cases", "gather_tokens", "norm-pix", "--json", str(out))
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    fused, separate = "mae norm-pix loss fwd+bwd", "mae norm-pix loss fwd+bwd (separate backward)"
    assert set(rows) == {"mae gather_tokens fwd", fused, separate}
    assert rows["mae gather_tokens fwd"]["kernels"] == {"_gather_rows_kernel": 1}
    assert rows[fused]["kernels"] == {"_masked_mse_fwd_kernel": 1}  # gradient from the forward, scaled by mul_
    assert rows[separate]["kernels"] == {"_masked_mse_fwd_kernel": 1, "_masked_mse_bwd_kernel": 1}
    assert all(r["us"] > 0 and r["aten_ops"] > 0 for r in rows.values())


def test_host_overhead_floor_of_nt_xent_issues_its_aten_ops(tmp_path):
    """The floor row that stands for nt_xent's own ATen ops issues exactly the ops an nt_xent call issues: when the
    op's glue changes, this fails until the floor row follows."""
    out = tmp_path / "host.json"
    _run("host_overhead.py", "--repeat", "3", "--cases", "^floor: nt_xent", r"^nt_xent fwd\+bwd$", "--json", str(out))
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    floor, op = rows["floor: nt_xent's ATen ops alone fwd+bwd"], rows["nt_xent fwd+bwd"]
    assert floor["launches"] == 0 and op["launches"] > 0
    assert floor["aten"] == op["aten"], (floor["aten"], op["aten"])


def test_host_overhead_driver_mode_times_the_launch_paths(tmp_path):
    """--launch-path driver: kernels compiled for sm_90, Triton's launch path and the cached one timed against
    the glue alone, with the launches a GPU makes (InfoNCE's 16-bit tile operands: `_unit_rows_kernel`, which
    the interpreter's configuration never launches)."""
    out = tmp_path / "driver.json"
    cases = ("--cases", "gather_tokens", r"^nt_xent fwd\+bwd$")
    _run("host_overhead.py", "--launch-path", "driver", "--repeat", "3", *cases, "--json", str(out))
    data = json.loads(out.read_text())
    assert data["launch_path"] == "driver"
    rows = {r["case"]: r for r in data["rows"]}
    assert set(rows) == {"mae gather_tokens fwd", "nt_xent fwd+bwd"}
    assert rows["mae gather_tokens fwd"]["kernels"] == {"_gather_rows_kernel": 1}
    assert rows["nt_xent fwd+bwd"]["kernels"]["_unit_rows_kernel"] == 1  # once, shared by both passes
    for row in rows.values():
        assert row["glue_launches"] == row["triton_launches"] == row["cached_launches"] == row["launches"]
        assert all(row[f"{v}_us"] > 0 for v in ("glue", "triton", "cached")), row
        assert row["triton_us_per_launch"] is not None and row["cached_us_per_launch"] is not None


def test_profile_ops_runs_the_cpu_smoke_cases(tmp_path):
    out = tmp_path / "profile.json"
    _run(
        "profile_ops.py",
        "--device",
        "cpu",
        "--cases",
        "nt_xent 2x64",
        "--calls",
        "2",
        "--python",
        "3",
        "--json",
        str(out),
    )
    (row,) = json.loads(out.read_text())
    assert row["op"] == "nt_xent" and row["wall_ms"] > 0 and row["host_ms"] > 0 and row["pipelined_ms"] is None
    own = [p["own_us"] for p in row["python"]]
    assert own == sorted(own, reverse=True) and own[0] > 0, row["python"]
    assert any(p["fn"].startswith("infonce.py:") for p in row["python"]), row["python"]


def test_every_cpu_smoke_case_runs():
    """`sslfast bench --device cpu` runs each op family's smoke case: fused and reference both time."""
    import torch

    from sslfast import bench

    rows = bench.run(torch.device("cpu"), warmup=0, repeat=1, log=lambda *_: None)
    ops = {r["op"] for r in rows}
    assert {"nt_xent", "moco_queue", "clip", "barlow_twins", "vicreg", "dino", "augment", "step"} <= ops, ops
    for r in rows:
        assert r["fused"]["ms"] > 0 and r["reference"]["ms"] > 0, r
    for r in rows:  # the terminal losses also time their separate backward, listed under the main table
        if r["op"] in ("nt_xent", "moco_queue", "clip", "dino"):
            assert r["separate_backward"]["ms"] > 0, r
    assert "other ways, same inputs" in bench.table(rows)


@pytest.mark.gpu
def test_capture_replays_fused_ops():
    """`bench.capture` (behind the "graphed" column) records a fused forward+backward whose replay recomputes
    the eager gradient."""
    import torch

    import sslfast as sf
    from sslfast import bench

    dev = torch.device("cuda")
    z1, z2 = (torch.randn(300, 96, device=dev, requires_grad=True) for _ in range(2))
    step = bench.fwd_bwd(lambda: sf.nt_xent_loss(z1, z2, 0.2), z1, z2)
    step()
    eager = z1.grad.clone()
    graph = bench.capture(step, dev)
    z1.grad.fill_(float("nan"))  # the gradient tensor the capture allocated: the replay must overwrite it
    graph.replay()
    torch.testing.assert_close(z1.grad, eager, rtol=1e-4, atol=1e-6)
    assert bench.graphed_ms(step, dev) > 0


@pytest.mark.gpu
def test_capture_reports_no_graph_when_refused_or_empty(recwarn):
    """No graphed time from a capture torch refuses (AdamW without capturable=True, the bench's reference
    optimizer step) or one that records no kernel, and no "CUDA Graph is empty" warning left from either."""
    import torch

    from sslfast import bench

    dev = torch.device("cuda")
    x = torch.randn(64, device=dev)
    p = torch.nn.Parameter(x.clone())
    p.grad = torch.ones_like(p)
    assert bench.capture(torch.optim.AdamW([p]).step, dev) is None
    assert bench.capture(lambda: x.view(8, 8), dev) is None  # a view launches nothing
    assert bench.graphed_ms(lambda: x.view(8, 8), dev) is None
    assert not [w for w in recwarn if "CUDA Graph is empty" in str(w.message)]
    assert bench.capture(lambda: x.mul_(1.0), dev) is not None


def test_largest_batch_search_finds_the_boundary_without_repeating_a_probe():
    import random

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from max_batch import largest

    rng = random.Random(0)
    for _ in range(300):
        step = rng.choice([1, 8, 64])
        most, start, limit = rng.randint(step, 5000), rng.randint(1, 6000), rng.randint(0, 6000)
        probes = []

        def fits(b):
            assert b % step == 0 and step <= b <= most
            probes.append(b)
            return b <= limit

        assert largest(fits, start, step, most) == min(limit, most) // step * step
        assert len(probes) == len(set(probes))


def test_max_batch_runs_the_cpu_smoke(tmp_path):
    """The probe loop on the CPU (nothing runs out of memory there, so every path reaches --max)."""
    out = tmp_path / "max.json"
    _run(
        "max_batch.py",
        "--device",
        "cpu",
        "--backbone",
        "resnet_tiny",
        "--size",
        "16",
        "--methods",
        "simclr",
        "--start",
        "8",
        "--step",
        "8",
        "--max",
        "16",
        "--json",
        str(out),
    )
    (row,) = json.loads(out.read_text())
    assert (row["method"], row["fused"], row["reference"]) == ("simclr", 16, 16)


def test_tune_mae_configs_agree_with_the_default(tmp_path):
    """Two candidates on either side of the interpreter's default (BLOCK_R=16); 8 leaves a partial last block of
    the 98 kept patches. The interpreter's time grows with the programs launched (patches / BLOCK_R), so the
    smaller candidate is 2, not 1 (392 programs a pass)."""
    out = tmp_path / "tune.json"
    _run("tune_mae.py", "--device", "cpu", "--only", "2:4", "8:2", "--json", str(out), interpret=True)
    rows = json.loads(out.read_text())
    assert len(rows) == 8 and all(r["matches_default"] for r in rows)  # 4 passes x 2 configs
