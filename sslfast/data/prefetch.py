"""`Prefetcher`: a background thread that produces batch k + 1 (and k + 2, …, up to `depth`) while the training
step consumes batch k, and measures how long the consumer waited for data.

    loader = sf.data.Prefetcher(sf.data.SSLLoader(...), depth=2, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for views in loader:            # same batches, same order, same content as the loader's
            train_step(views)
        log(data_wait_s=loader.epoch_wait_s)

Timing: `wait_s` is the host time the last `next()` blocked on the queue (0 when the batch was ready),
`epoch_wait_s` / `step_waits` sum / list it over the current pass, `total_wait_s` over the object's life.
A step that never waits has wait ≈ 0; one whose loader is slower than the step waits ≈ loader − step time.

CUDA (`device` a CUDA device): host tensors are pinned and copied on a side stream (the loader itself also
runs under that stream, so a loader that computes on the GPU — the native backend — overlaps too); the
consumer's current stream waits on an event recorded after the copies (no host synchronization), and every
tensor handed out is `record_stream`-ed on the consumer's stream so the caching allocator does not reuse its
memory while the step still reads it.

Errors raised by the loader are re-raised in the consumer at the position they occurred (after the batches
produced before them). The thread is stopped and joined on `close()`, at the end of a pass, when the
consumer breaks out of its loop or raises (the pass's generator is closed), and on `with` exit.
"""

from __future__ import annotations

import queue
import threading
import time

import torch

_END = object()
_POLL_S = 0.05


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _map_tensors(fn, obj):
    """`obj` with `fn` applied to every tensor inside (lists, tuples, dicts nested)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        out = [_map_tensors(fn, x) for x in obj]
        return type(obj)(*out) if hasattr(obj, "_fields") else type(obj)(out)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(fn, v)) for k, v in obj.items())
    return obj


class _Pass:
    """One pass over the loader: the producer thread and its bounded queue."""

    def __init__(self, loader, depth: int, device: torch.device | None):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.device = device
        self.cuda = device is not None and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.thread = threading.Thread(target=self._produce, args=(loader,), name="sslfast-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        """Blocks while the queue is full; False once the pass is stopped."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _to_device(self, batch):
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device == self.device:
                return t
            if t.device.type == "cpu" and not t.is_pinned():
                t = t.pin_memory()
            return t.to(self.device, non_blocking=True)

        with torch.cuda.stream(self.stream):
            batch = _map_tensors(move, batch)
            event = torch.cuda.Event()
            event.record(self.stream)
        return batch, event

    def _produce(self, loader) -> None:
        it = None
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            it = iter(loader)
            while not self.stop.is_set():
                if self.cuda:
                    with torch.cuda.stream(self.stream):
                        batch = next(it, _END)
                else:
                    batch = next(it, _END)
                if batch is _END:
                    break
                item = self._to_device(batch) if self.cuda else (batch, None)
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as err:  # handed to the consumer, re-raised there
            self._put(_Failure(err))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass

    def get(self):
        """The next item (the end marker once the pass is closed); RuntimeError if the producer died without a
        word (it always sends one)."""
        while True:
            if self.stop.is_set():
                return _END
            try:
                return self.queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("the prefetch thread ended without a batch, an end marker or an error") from None

    def close(self, timeout: float | None) -> None:
        self.stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


class Prefetcher:
    """Iterable over `loader`'s batches, read ahead by a background thread into a queue of `depth` batches.

    Each `iter()` starts a pass (closing the one before); an exception of the loader is raised in the consumer
    at the batch where it occurred. `wait_s` / `epoch_wait_s` / `total_wait_s` and `step_waits`: the seconds the
    consumer waited for the last batch / this pass / all passes, and per batch of this pass.

    Args:
        loader: any iterable of batches (tensors, or lists / tuples / dicts of tensors), e.g. an `SSLLoader`;
            `len()` and `set_epoch()` are passed through.
        depth: batches held ready (>= 1).
        device: None keeps batches where the loader puts them; a CUDA device copies host tensors there on a
            side stream (pinned memory) with stream-ordered hand-over (see the module doc); "cpu" is accepted
            (no copy).
        join_timeout: seconds `close()` waits for the thread (None: as long as the loader's current batch
            takes).

    Raises:
        TypeError: `depth` is not an int, or `loader` is not iterable.
        ValueError: `depth` < 1, or a device other than None, CPU or CUDA.
        RuntimeError: a CUDA device without CUDA.
    """

    def __init__(self, loader, depth: int = 2, device=None, *, join_timeout: float | None = None):
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise TypeError(f"depth must be an int, got {type(depth).__name__}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if device is not None:
            device = torch.device(device)
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"device must be None, 'cpu' or a CUDA device, got {device}")
            if device.type == "cuda":
                if not torch.cuda.is_available():
                    raise RuntimeError("device='cuda' but CUDA is not available")
                if device.index is None:
                    device = torch.device("cuda", torch.cuda.current_device())
            else:
                device = None
        if not hasattr(loader, "__iter__"):
            raise TypeError(f"loader must be iterable, got {type(loader).__name__}")
        self.loader = loader
        self.depth = depth
        self.device = device
        self.join_timeout = join_timeout
        self._pass: _Pass | None = None
        self.wait_s = 0.0
        self.epoch_wait_s = 0.0
        self.total_wait_s = 0.0
        self.step_waits: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Passed to the loader; call it before starting the pass (`iter`), as with the loader itself."""
        self.loader.set_epoch(epoch)

    def __iter__(self):
        self.close()
        self.wait_s = self.epoch_wait_s = 0.0
        self.step_waits = []
        self._pass = _Pass(self.loader, self.depth, self.device)
        return self._consume(self._pass)

    def _consume(self, p: _Pass):
        try:
            while True:
                t0 = time.perf_counter()
                item = p.get()
                wait = time.perf_counter() - t0
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                self.wait_s = wait
                self.epoch_wait_s += wait
                self.total_wait_s += wait
                self.step_waits.append(wait)
                batch, event = item
                if event is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(event)
                    _map_tensors(lambda t: t.record_stream(stream) if t.is_cuda else None, batch)
                yield batch
        finally:
            p.close(self.join_timeout)
            if self._pass is p:
                self._pass = None

    @property
    def alive(self) -> bool:
        """Whether a producer thread is running."""
        return self._pass is not None and self._pass.thread.is_alive()

    def close(self) -> None:
        """Stops the current pass (if any) and joins its thread."""
        if self._pass is not None:
            self._pass.close(self.join_timeout)
            self._pass = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
