"""Shared pieces of the run-safety tests: the small pretraining flags and the CLI expected to fail with one line
(the fixtures `finished_run` and `run_copy` are in conftest.py)."""

import os

import pytest
import torch

from sslfast import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch-size", "128", "--no-knn", "--no-progress"]
STEPS_PER_EPOCH = 1438 // 128  # the digits' training split at batch 128


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _fails(argv, capsys, code=2) -> str:
    """Runs the CLI, expects exit status `code` with one line on stderr and no traceback; returns that line."""
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the CLI")
    captured = capsys.readouterr()
    assert exc.value.code == code, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]
