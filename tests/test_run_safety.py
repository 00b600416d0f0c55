"""Run safety of `sslfast pretrain` / `sslfast eval`: runs are never silently destroyed (refusal, lock, unique
temporaries, a kept fallback), only finite state is saved, --resume and its flags, fail-fast checks and one-line
user errors, Ctrl-C, skipped images. Loading safety: tests/test_run_safety_loading.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from sslfast import cli
from sslfast.methods.simclr import SimCLR
from sslfast.train import loop
from sslfast.train.checkpoint import run_lock, save_atomic
from run_helpers import REPO, SMALL, STEPS_PER_EPOCH, _fails, _load


# ------------------------------------------------------------------------------------------------ 2. never destroyed
def test_new_run_refuses_a_folder_holding_a_run(run_copy, capsys):
    before = (run_copy / "checkpoint.pt").read_bytes()
    line = _fails(["pretrain", "--epochs", "1", *SMALL, "--out", str(run_copy)], capsys)
    assert "holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (run_copy / "checkpoint.pt").read_bytes() == before


def test_overwrite_replaces_and_ctrl_c_before_a_checkpoint(run_copy, monkeypatch, capsys):
    def interrupted(run, views):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_step", interrupted)
    line = _fails(["pretrain", "--epochs", "1", *SMALL, "--overwrite", "--out", str(run_copy)], capsys, code=130)
    assert "no checkpoint was written yet" in line
    assert not (run_copy / "checkpoint.pt").exists() and not (run_copy / "metrics.json").exists()


def test_save_atomic_keeps_the_previous_checkpoint(tmp_path):
    path, prev = str(tmp_path / "checkpoint.pt"), str(tmp_path / "checkpoint.prev.pt")
    for epoch in (1, 2, 3):
        save_atomic({"epoch": epoch}, path, keep_previous=prev)
    assert _load(path)["epoch"] == 3 and _load(prev)["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_concurrent_writers_use_their_own_temporaries(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    errors = []

    def writer(k):
        try:
            for i in range(30):
                save_atomic({"epoch": i, "writer": k, "w": torch.full((2000,), float(k))}, path)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    state = _load(path)
    assert torch.equal(state["w"], torch.full((2000,), float(state["writer"])))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_resume_falls_back_to_the_previous_checkpoint(run_copy, capsys):
    shutil.copyfile(run_copy / "checkpoint.pt", run_copy / "checkpoint.prev.pt")
    (run_copy / "checkpoint.pt").write_bytes(b"torn")
    assert cli.main(["pretrain", "--resume", "--out", str(run_copy), "--no-progress", "--no-knn"]) == 0
    out = capsys.readouterr().out
    assert "falling back to the previous checkpoint" in out and "checkpoint.prev.pt" in out


def test_two_processes_on_one_run_folder(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sslfast.cli", "pretrain", "--epochs", "3", *SMALL, "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        lock = out / ".lock"
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"another sslfast process is using {out}" in lines[0], second.stderr
        assert first.poll() is None  # untouched by the refused one
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with run_lock(str(out)):  # the OS released the crashed run's lock
        pass


# ------------------------------------------------------------------------------------------------ 3. finite state
def test_nonfinite_state_stops_before_the_checkpoint(run_copy, monkeypatch, capsys):
    """A weight poisoned at the last step of epoch 2 (the loss stays finite): the run stops with status 3 and
    the checkpoint of epoch 1 stays as it was, all finite."""
    after_step, calls = SimCLR.after_step, []

    def poisoned(self):
        after_step(self)
        calls.append(1)
        if len(calls) == STEPS_PER_EPOCH:
            with torch.no_grad():
                next(self.parameters()).view(-1)[3] = float("nan")

    monkeypatch.setattr(SimCLR, "after_step", poisoned)
    before = (run_copy / "checkpoint.pt").read_bytes()
    line = _fails(["pretrain", "--resume", "--epochs", "2", "--out", str(run_copy), "--no-progress"], capsys, code=3)
    assert "non-finite values in" in line and "after epoch 2" in line and "(epoch 1) is kept" in line
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    state = _load(run_copy / "checkpoint.pt")
    assert state["epoch"] == 1
    tensors = list(state["method"].values()) + [v for s in state["optimizer"]["state"].values() for v in s.values()]
    assert all(torch.isfinite(t).all() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


# ------------------------------------------------------------------------------------------------ 4. --resume flags
def test_resume_refuses_changed_flags(run_copy, capsys):
    line = _fails(
        [
            "pretrain",
            "--resume",
            "--out",
            str(run_copy),
            "--seed",
            "5",
            "--batch-size",
            "64",
            "--method",
            "simclr",
            "--no-progress",
        ],
        capsys,
    )
    assert "--seed: saved 0, given 5" in line and "--batch-size: saved 128, given 64" in line
    assert "--method" not in line.split("(only")[0]  # equal to the saved value: not a difference


def test_resume_extends_epochs_with_a_new_lr(run_copy, capsys):
    saved = _load(run_copy / "checkpoint.pt")
    assert (
        cli.main(
            [
                "pretrain",
                "--resume",
                "--out",
                str(run_copy),
                "--epochs",
                "2",
                "--lr",
                "0.5",
                "--no-progress",
                "--no-knn",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "--epochs 2 instead of the saved 1" in out and "--lr 0.5 instead of the saved" in out
    state = _load(run_copy / "checkpoint.pt")
    assert state["epoch"] == 2 and state["config"]["epochs"] == 2 and state["config"]["lr"] == 0.5
    assert state["scheduler"]["last_epoch"] == 2 * STEPS_PER_EPOCH
    ratio = 0.5 / saved["config"]["lr"]
    for old, new in zip(saved["scheduler"]["base_lrs"], state["scheduler"]["base_lrs"]):
        assert new == pytest.approx(old * ratio, rel=1e-12)
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["finished"] and [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert _load(run_copy / "checkpoint.prev.pt")["epoch"] == 1


# ------------------------------------------------------------------------------------------------ 5, 6. user errors
@pytest.mark.parametrize(
    "argv,match",
    [
        (["pretrain", "--workers", "0"], "--workers must be a positive integer, got 0"),
        (["pretrain", "--workers", "-3"], "--workers must be a positive integer, got -3"),
        (["pretrain", "--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
        (["pretrain", "--warmup-epochs", "-1"], "--warmup-epochs must be a finite number >= 0"),
        (["pretrain", "--stop-after", "0"], "--stop-after must be a positive integer, got 0"),
        (["pretrain", "--device", "tpu7"], "--device: unknown device 'tpu7'"),
        pytest.param(
            ["pretrain", "--device", "cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        (["pretrain", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
        (["eval", "--epochs", "0"], "--epochs must be a positive integer, got 0"),
        (["eval", "--epochs", "-1"], "--epochs must be a positive integer, got -1"),
        (["eval", "--device", "tpu7"], "--device: unknown device 'tpu7'"),
    ],
)
def test_bad_arguments_are_one_line(argv, match, tmp_path, capsys):
    if argv[0] == "pretrain":
        argv = [*argv, "--out", str(tmp_path / "run"), "--no-progress"]
    assert match in _fails(argv, capsys)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_unusable_out(where, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if where == "file" else blocker / "run"
    line = _fails(["pretrain", "--epochs", "1", *SMALL, "--out", str(out)], capsys)
    assert line.startswith("sslfast pretrain: error: --out:") and str(out) in line


def test_eval_json_checked_before_the_evaluation(finished_run, tmp_path, monkeypatch, capsys):
    import sslfast.train

    monkeypatch.setattr(sslfast.train, "evaluate", lambda *a, **k: pytest.fail("evaluated before the --json check"))
    line = _fails(["eval", "--checkpoint", str(finished_run), "--json", str(tmp_path / "no" / "x.json")], capsys)
    assert "--json" in line


def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_resume(run_copy, monkeypatch, capsys):
    step, calls = loop.train_step, []

    def interrupted(run, views):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(run, views)

    monkeypatch.setattr(loop, "train_step", interrupted)
    before = (run_copy / "checkpoint.pt").read_bytes()
    line = _fails(["pretrain", "--resume", "--epochs", "2", "--out", str(run_copy), "--no-progress"], capsys, code=130)
    assert "epoch 1 is kept" in line and f"sslfast pretrain --resume --out {run_copy}" in line
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    assert not [n for n in os.listdir(run_copy) if n.endswith(".tmp")]


def _garbage(folder, n):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        with open(os.path.join(folder, f"bad_{i}.jpg"), "wb") as f:
            f.write(b"this is not an image" * (i + 1))


@pytest.mark.parametrize("content", ["empty", "nothing_decodes"])
def test_unusable_data_folder(content, tmp_path, capsys):
    data = tmp_path / "images"
    data.mkdir()
    if content == "nothing_decodes":
        _garbage(data / "class_0", 20)
    line = _fails(
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
            "4",
            "--no-progress",
            "--no-knn",
            "--out",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert line.startswith("sslfast pretrain: error: --data:")


def test_skipped_images_are_counted(tmp_path, capsys):
    from sslfast.data.synthetic import write_jpeg_folder

    data = tmp_path / "images"  # train/ + val/: pretraining reads every training image (no split)
    write_jpeg_folder(data / "train", 45, size=(20, 18), classes=3, distinct=5)
    write_jpeg_folder(data / "val", 9, size=(20, 18), classes=3, distinct=5)
    _garbage(data / "train" / "class_1", 3)
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "pretrain",
                "--data",
                str(data),
                "--backbone",
                "resnet_tiny",
                "--profile",
                "small",
                "--image-size",
                "16",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--no-progress",
                "--no-knn",
                "--out",
                str(out),
            ]
        )
        == 0
    )  # 48 training files, 6 full batches: every file is read
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_images"] == 3 == metrics["epochs"][-1]["skipped_images"]
    assert sorted(os.path.basename(p) for p in metrics["bad_files"]) == ["bad_0.jpg", "bad_1.jpg", "bad_2.jpg"]
    assert "3 undecodable image(s) skipped" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ bench
def test_bench_unknown_op_family(capsys):
    line = _fails(["bench", "--ops", "nosuchop"], capsys)
    assert "unknown op family nosuchop" in line and "nt_xent" in line


def test_bench_plot_without_matplotlib_fails_before_any_work(tmp_path, monkeypatch, capsys):
    import sslfast.bench

    monkeypatch.setattr(sslfast.bench, "run", lambda *a, **k: pytest.fail("benchmarked before the --plot check"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "--plot needs matplotlib" in _fails(["bench", "--plot", str(tmp_path / "p.png")], capsys)
