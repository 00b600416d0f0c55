"""Run safety, loading: checkpoints and their RNG and optimizer state load with `weights_only=True` and never run
code; bad checkpoint files are one-line errors."""

import io
import os
import random

import numpy as np
import pytest
import torch

from sslfast.optim import LARSEMA
from sslfast.train.checkpoint import rng_state, set_rng_state
from run_helpers import _fails


# ------------------------------------------------------------------------------------------------ 1. no code runs
class _Payload:
    """Unpickling this calls open(marker, "w"): a file appears if the loader runs code from the checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(path, marker):
    torch.save({"method": {}, "config": {"method": "simclr"}, "epoch": 1, "payload": _Payload(str(marker))}, path)


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_crafted_checkpoint_runs_no_code(command, tmp_path, capsys):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    _crafted(out / "checkpoint.pt", marker)
    _crafted(out / "checkpoint.prev.pt", marker)  # the fallback is read as safely
    argv = (
        ["eval", "--checkpoint", str(out / "checkpoint.pt")]
        if command == "eval"
        else ["pretrain", "--resume", "--out", str(out), "--no-progress"]
    )
    line = _fails(argv, capsys)
    assert not marker.exists()
    assert "not a readable sslfast checkpoint" in line


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "foreign"])
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_bad_checkpoint_files_are_one_line_errors(kind, command, finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = (finished_run / "checkpoint.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(os.urandom(1000))
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    argv = (
        ["eval", "--checkpoint", str(out)]
        if command == "eval"
        else ["pretrain", "--resume", "--out", str(out), "--no-progress"]
    )
    line = _fails(argv, capsys)
    assert str(path) in line and ("--checkpoint" if command == "eval" else "--resume") in line


def test_rng_state_loads_weights_only_and_restores_exactly(seed):
    np.random.seed(seed % 2**32)
    random.seed(seed)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    want = (np.random.randn(7), np.random.randint(0, 1 << 30, 5), random.random(), torch.rand(3))
    np.random.seed(0)
    random.seed(0)
    set_rng_state(state)
    got = (np.random.randn(7), np.random.randint(0, 1 << 30, 5), random.random(), torch.rand(3))
    assert np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    assert want[2] == got[2] and torch.equal(want[3], got[3])


@pytest.mark.parametrize("exclude", ["bias_and_norm", "callable", None])
def test_lars_state_dict_is_plain_data_and_resumes_exactly(exclude, seed):
    rule = (lambda p: p.shape[0] == 5) if exclude == "callable" else exclude
    shapes = [(5, 3), (5,), (7, 2, 3), (1,)]
    start = [torch.randn(s) for s in shapes]

    def build():
        params = [torch.nn.Parameter(t.clone()) for t in start]
        return params, LARSEMA(params, lr=0.1, weight_decay=1e-3, exclude=rule)

    def step(params, opt, k):
        g = torch.Generator().manual_seed(seed + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()

    a_params, a = build()
    for k in range(3):
        step(a_params, a, k)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # no pickled function in the param groups
    b_params, b = build()
    with torch.no_grad():
        for p, q in zip(b_params, a_params):
            p.copy_(q)
    b.load_state_dict(state)
    for k in range(3, 5):
        step(a_params, a, k)
        step(b_params, b, k)
    for p, q in zip(a_params, b_params):
        assert torch.equal(p, q)
    assert all(g["exclude"] is None or isinstance(g["exclude"], str) for g in a.state_dict()["param_groups"])


def test_lars_unknown_exclude_rule_is_an_error():
    with pytest.raises(ValueError, match="exclude: unknown rule 'bias'"):
        LARSEMA([torch.nn.Parameter(torch.ones(3))], exclude="bias")
