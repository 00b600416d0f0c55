"""Test harness shared by every op's tests.

* Without CUDA, Triton kernels run through the interpreter (TRITON_INTERPRET=1, set before any kernel
  module is imported), so `SSLFAST_BACKEND=triton` exercises the real kernels on the CPU.
* SSLFAST_POISON=1: launchers fill their outputs with NaN before a kernel writes them.
* `backend` fixture: runs a test once on the reference (PyTorch) path and once on the Triton path.
* `gpu` marker: skipped without CUDA.
* Under pytest-xdist (`-n 2`, the README's command) each worker process computes on one CPU thread, and so do the
  processes it starts (OMP_NUM_THREADS, inherited, unless already set): W workers on W cores then share the
  machine instead of oversubscribing it. A test that needs more threads sets them itself and restores them.
  What the workers share stays race-free: every fixture and test writes under its own `tmp_path` (xdist gives each
  worker its own base temp folder), process groups rendezvous through a fresh temporary file
  (`distributed_harness.run_ranks`, no fixed port), and Triton's compile cache (TRITON_CACHE_DIR, used by the
  ahead-of-time compile tests) writes each entry into a unique temporary folder that it then renames into place,
  so concurrent workers compiling the same kernel each leave a whole entry.
"""

import os

# Before torch loads its OpenMP runtime; a value the developer set is kept.
_ONE_THREAD = bool(os.environ.get("PYTEST_XDIST_WORKER")) and "OMP_NUM_THREADS" not in os.environ
if _ONE_THREAD:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if _ONE_THREAD:
    torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SSLFAST_POISON", "1")

import pytest  # noqa: E402

from sslfast._backend import interpreting, triton_available  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid"}


@pytest.fixture(autouse=True)
def _strict_interpreted_launches(monkeypatch):
    """A real launch rejects keyword arguments the kernel does not declare; the interpreter silently drops
    them. Make interpreted launches as strict as the GPU."""
    if not interpreting() or not triton_available():
        return
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def checked(self, *args, grid, warmup, **kwargs):
        unknown = set(kwargs) - set(self.arg_names) - _LAUNCH_OPTIONS
        assert not unknown, f"{self.fn.__name__} launched with undeclared arguments {sorted(unknown)}"
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", checked)


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """The CPU paths: plain PyTorch, and the Triton kernels under the interpreter."""
    if request.param == "triton" and not (triton_available() and interpreting()):
        pytest.skip("Triton kernels on CPU tensors need triton and TRITON_INTERPRET=1")
    monkeypatch.setenv("SSLFAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def seed():
    """A fresh seed per test (printed on failure through the assertion messages that include it)."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


# ------------------------------------------------------------------------------------- a finished pretraining run
@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished one-epoch SimCLR run on the digits (shared; tests work on copies: `run_copy`)."""
    from sslfast import cli

    out = tmp_path_factory.mktemp("finished") / "run"
    assert (
        cli.main(["pretrain", "--epochs", "1", "--batch-size", "128", "--no-knn", "--no-progress", "--out", str(out)])
        == 0
    )
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of `finished_run` the test may change."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# ------------------------------------------------------------------------------------- data
@pytest.fixture(params=["native", "dali"])
def loader_backend(request):
    """Each SSLLoader backend that runs on a CPU (DALI's CPU graph where nvidia-dali imports)."""
    from data_helpers import dali_or_skip

    if request.param == "dali":
        dali_or_skip()
    return request.param


@pytest.fixture(scope="session")
def jpeg_root(tmp_path_factory):
    """10 small JPEGs in two classes plus a non-image file that ImageFolder scanning must ignore."""
    from sslfast.data.synthetic import write_jpeg_folder

    root = tmp_path_factory.mktemp("jpegs")
    write_jpeg_folder(root, 10, size=(26, 20), classes=2, seed=3)
    (root / "class_0" / "notes.txt").write_text("not an image")
    return root
