"""sf.data.Prefetcher: read-ahead on a background thread — the measured data wait with a loader faster and slower
than the step (sleep-based fakes: they release the GIL, so the timings hold on a loaded machine; medians and
generous bounds), order and content unchanged, errors re-raised in the consumer, clean shutdown."""

import threading
import time

import numpy as np
import pytest
import torch

import sslfast as sf


class FakeLoader:
    """`n` batches (a list of two tensors and a dict), each taking `load_s` to produce; raises at `fail_at`."""

    def __init__(self, n, load_s=0.0, fail_at=None, seed=0):
        self.n, self.load_s, self.fail_at = n, load_s, fail_at
        g = torch.Generator().manual_seed(seed)
        self.data = [
            [torch.randn(3, 5, generator=g), {"k": torch.tensor(k), "x": torch.randn(7, generator=g)}] for k in range(n)
        ]
        self.epoch = None
        self.open_iterators = 0
        self.thread_names = set()

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        self.open_iterators += 1
        try:
            for k in range(self.n):
                time.sleep(self.load_s)
                self.thread_names.add(threading.current_thread().name)
                if k == self.fail_at:
                    raise ValueError(f"bad batch {k}")
                yield self.data[k]
        finally:
            self.open_iterators -= 1


def _same(a, b):
    return torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def _run(pf, step_s, steps=None):
    out = []
    for k, batch in enumerate(pf):
        out.append(batch)
        time.sleep(step_s)
        if steps is not None and k + 1 == steps:
            break
    return out


# ------------------------------------------------------------------------------------------- timing
def test_fast_loader_wait_is_near_zero():
    """Loader 5 ms per batch, step 30 ms: after the first batch the consumer (almost) never waits."""
    pf = sf.data.Prefetcher(FakeLoader(12, load_s=0.005), depth=2)
    _run(pf, 0.030)
    waits = pf.step_waits
    assert len(waits) == 12
    steady = waits[1:]
    assert np.median(steady) < 0.003 and np.mean(steady) < 0.006, [round(w * 1e3, 1) for w in waits]
    assert pf.epoch_wait_s == pytest.approx(sum(waits)) and pf.wait_s == waits[-1]


def test_slow_loader_wait_is_the_loader_excess():
    """Loader 40 ms, step 10 ms: each step waits ≈ 40 − 10 = 30 ms (without read-ahead it would wait 40)."""
    pf = sf.data.Prefetcher(FakeLoader(10, load_s=0.040), depth=2)
    _run(pf, 0.010)
    steady = pf.step_waits[2:]
    assert 0.020 < np.median(steady) < 0.038, [round(w * 1e3, 1) for w in pf.step_waits]
    assert pf.total_wait_s >= pf.epoch_wait_s > 0.2


# ------------------------------------------------------------------------------------------- content
@pytest.mark.parametrize("depth", [1, 3])
def test_order_and_content_unchanged(seed, depth):
    ld = FakeLoader(9, seed=seed)
    want = list(ld)
    ld.thread_names.clear()
    pf = sf.data.Prefetcher(ld, depth=depth)
    for _ in range(2):  # a second pass restarts the loader
        got = list(pf)
        assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))
        assert len(pf.step_waits) == 9
    assert ld.thread_names == {"sslfast-prefetch"}  # produced on the background thread
    assert len(pf) == 9 and not pf.alive and ld.open_iterators == 0
    pf.set_epoch(4)
    assert ld.epoch == 4


def test_with_the_ssl_loader(seed):
    """An SSLLoader through the Prefetcher: the same views as iterating it directly, epoch by epoch."""
    images = np.random.default_rng(seed).integers(0, 256, (10, 13, 11, 3), dtype=np.uint8)
    kw = dict(preset="byol", batch_size=3, device="cpu", image_size=8, seed=seed, num_workers=1)
    direct = sf.data.SSLLoader(images, **kw)
    pf = sf.data.Prefetcher(sf.data.SSLLoader(images, **kw), depth=2)
    for epoch in (0, 1):
        direct.set_epoch(epoch)
        pf.set_epoch(epoch)
        got, want = list(pf), list(direct)
        assert len(got) == len(want) == 3
        assert all(torch.equal(x, y) for a, b in zip(got, want) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------- errors, shutdown
def test_loader_error_reaches_the_consumer():
    ld = FakeLoader(8, fail_at=3)
    pf = sf.data.Prefetcher(ld, depth=2)
    got = []
    with pytest.raises(ValueError, match="bad batch 3"):
        for batch in pf:
            got.append(batch)
    assert len(got) == 3 and all(_same(a, b) for a, b in zip(got, ld.data))
    assert not pf.alive and ld.open_iterators == 0


def test_break_and_consumer_error_stop_the_thread():
    ld = FakeLoader(1000, load_s=0.001)
    pf = sf.data.Prefetcher(ld, depth=2)
    assert len(_run(pf, 0.0, steps=3)) == 3
    assert not pf.alive and ld.open_iterators == 0  # the break closed the pass: thread joined, loader closed
    with pytest.raises(KeyError):
        for k, _ in enumerate(pf):
            if k == 2:
                raise KeyError("step failed")
    assert not pf.alive and ld.open_iterators == 0


def test_close_joins_a_blocked_producer():
    """The producer blocks on the full queue while the consumer holds a batch; close() unblocks and joins it,
    the loader's iterator is closed, and the consumer's next step ends the pass."""
    ld = FakeLoader(100)
    pf = sf.data.Prefetcher(ld, depth=1)
    it = iter(pf)
    first = next(it)
    time.sleep(0.05)
    thread = pf._pass.thread
    assert thread.is_alive()
    pf.close()
    assert not thread.is_alive() and not pf.alive and ld.open_iterators == 0
    assert _same(first, ld.data[0]) and list(it) == []
    with sf.data.Prefetcher(FakeLoader(100), depth=2) as pf2:
        it2 = iter(pf2)
        next(it2)
        assert pf2.alive
    assert not pf2.alive and list(it2) == []


def test_argument_errors():
    with pytest.raises(ValueError, match="depth"):
        sf.data.Prefetcher(FakeLoader(2), depth=0)
    with pytest.raises(TypeError, match="depth"):
        sf.data.Prefetcher(FakeLoader(2), depth=2.0)
    with pytest.raises(TypeError, match="loader"):
        sf.data.Prefetcher(42)
    with pytest.raises(ValueError, match="device"):
        sf.data.Prefetcher(FakeLoader(2), device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            sf.data.Prefetcher(FakeLoader(2), device="cuda")


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_copies_on_a_side_stream():
    """Host batches arrive on the GPU equal to the loader's, and the consumer's work on them (on its own
    stream, right away) sees the copied values; a loader that computes on the GPU is overlapped too."""
    ld = FakeLoader(20, load_s=0.002)
    pf = sf.data.Prefetcher(ld, depth=2, device="cuda")
    sums = []
    for batch in pf:
        assert batch[0].is_cuda and batch[1]["x"].is_cuda
        sums.append((batch[0].double().sum() + batch[1]["x"].double().sum()))
    want = [b[0].double().sum() + b[1]["x"].double().sum() for b in ld.data]
    assert torch.allclose(torch.stack(sums).cpu(), torch.stack(want))

    class GpuLoader:
        def __iter__(self):
            for k in range(10):
                x = torch.full((256, 256), float(k), device="cuda")
                yield [x @ x / 256]

    got = [b[0][0, 0].item() for b in sf.data.Prefetcher(GpuLoader(), device="cuda")]
    assert got == [float(k * k) for k in range(10)]
