"""`sslfast pretrain --cuda-graph`: the whole training step captured once in a CUDA graph and replayed per batch.

One replay launches the forward, the backward, the method's pre-step hook, the optimizer step with its fused
teacher EMA (or the separate EMA update) and the BatchNorm statistics' copy to the teacher: every kernel of an
eager `train_step`, with none of its host work between launches. A step of the replayed graph computes what
the eager step computes; three things make that hold.

* **Static inputs.** The graph reads its views from buffers allocated at capture; each batch is copied into
  them (device to device, or from pinned host memory) before the replay. The views must keep their shapes
  (the trainer's loaders drop the last partial batch); another shape is refused, never silently padded.
* **What changes per step lives on the device.** The learning rate of each param group and the EMA momentum
  are 0-dim fp32 device tensors that the kernels read when they run (`sslfast.optim`'s fused steps, torch's
  fused SGD); before each replay they are filled with this step's values from the run's usual schedules,
  which keep running on the host, unchanged (the param groups hold floats outside the capture, so the
  scheduler, the progress bar and the checkpoints see what they always saw). Being fp32, they differ from the
  eager step's float64 values by at most half an fp32 ulp (3e-8 relative). Random draws (MAE's masks, dropout)
  come from the device generator, whose offset a replay advances.
* **What the host counts, the host keeps counting.** A replay runs no Python, so after it the trainer does
  the host half of the step itself: the scheduler step, the teacher's step count (its momentum schedule),
  the method's `after_step`. A method whose forward or hooks read other host state that changes between
  steps cannot be captured; it declares why in `Method.graph_refusal` and `--cuda-graph` refuses it.

The first `warmup` steps run eagerly on a side stream (cuDNN's and cuBLAS's first-call work, the optimizer's
state and launch plans, Triton's compilation: nothing of that may happen inside a capture), then the step is
captured with the next batch, which the first replay trains on. Capture reuses the graph's private memory
pool for every replay: gradients and activations stay at fixed addresses.
"""

from __future__ import annotations

import contextlib

import torch

WARMUP_STEPS = 3


class CudaGraph:
    """`torch.cuda.CUDAGraph` behind `capture(fn)` / `replay()` (the seam the CPU tests fill with a stand-in
    that re-runs `fn` eagerly per replay)."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn) -> None:
        # thread-local: the loader's threads keep decoding and copying the next batches during the capture (the
        # global mode would fail their allocations and synchronizations)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class GraphedStep:
    """`train_step` of a `Run` by CUDA-graph replay (`sslfast.train.step.train_step` calls it when the run was
    set up with `cuda_graph=True`).

    Args:
        run: what `setup` built; one process, a method without `graph_refusal`.
        warmup: eager steps before the capture.
        graph_factory: makes the graph (`CudaGraph`; tests pass a stand-in).

    Raises:
        ValueError: views of another shape or dtype than the captured ones (`__call__`).
    """

    def __init__(self, run, *, warmup: int = WARMUP_STEPS, graph_factory=CudaGraph):
        self.run = run
        self.warmup = warmup
        self.graph_factory = graph_factory
        self.graph = None
        self.static_views: list[torch.Tensor] | None = None
        self.static_loss: torch.Tensor | None = None
        dev = run.device
        self.lrs = [torch.zeros((), dtype=torch.float32, device=dev) for _ in run.optimizer.param_groups]
        ema = run.method.ema
        self.momentum = None if ema is None else torch.zeros((), dtype=torch.float32, device=dev)
        self.side_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    # ------------------------------------------------------------------------------------------ one step
    def __call__(self, views) -> torch.Tensor:
        """One optimizer step on `views` (this rank's list of [B, C, H, W] tensors); returns its loss (a fresh
        0-dim tensor on the device, read back by the caller whenever it likes)."""
        from .step import train_step

        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            with self._on_side_stream():
                return train_step(self.run, views, graphed=False)
        if self.graph is None:
            self._capture(views)
        self._load(views)
        self._fill_scalars()
        self.graph.replay()
        self._host_half()
        return self.static_loss.clone()

    def _load(self, views) -> None:
        if len(views) != len(self.static_views) or any(
            v.shape != s.shape or v.dtype != s.dtype for v, s in zip(views, self.static_views)
        ):
            got = [(tuple(v.shape), v.dtype) for v in views]
            want = [(tuple(s.shape), s.dtype) for s in self.static_views]
            raise ValueError(f"views: --cuda-graph replays the step captured for views {want}, got {got}")
        for s, v in zip(self.static_views, views):
            s.copy_(v, non_blocking=True)

    def _fill_scalars(self) -> None:
        """This step's learning rates and EMA momentum into the tensors the captured kernels read."""
        for t, group in zip(self.lrs, self.run.optimizer.param_groups):
            t.fill_(group["lr"])
        if self.momentum is not None:
            self.momentum.fill_(self.run.method.ema.momentum)

    def _host_half(self) -> None:
        """What `optimizer_step` does on the host, which a replay does not: the schedules advance."""
        run = self.run
        run.scheduler.step()
        if run.method.ema is not None:
            run.method.ema.step += 1
        run.method.after_step()

    # ------------------------------------------------------------------------------------------ capture
    def _capture(self, views) -> None:
        run = self.run
        self.static_views = [v.to(run.device, non_blocking=True).clone() for v in views]
        self.static_loss = torch.zeros((), dtype=torch.float32, device=run.device)
        if self.side_stream is not None:  # the warm-up's side-stream work done before the capture reads state
            torch.cuda.current_stream(run.device).wait_stream(self.side_stream)
            # the warm-up's freed activations go back to the device: the graph's own pool takes their place
            torch.cuda.synchronize(run.device)
            torch.cuda.empty_cache()
        run.optimizer.zero_grad(set_to_none=True)  # the backward allocates the gradients in the graph's pool
        self.graph = self.graph_factory()
        self.graph.capture(self._captured_step)

    def _captured_step(self) -> None:
        """The device half of `train_step`, as captured: the lrs and the momentum are the device tensors, and
        the host state the optimizer and the EMA advance while it runs is put back (the replay's host half
        advances it once per real step)."""
        from .step import forward_backward

        run = self.run
        with self._device_scalars():
            loss = forward_backward(run, self.static_views, cache_casts=False)
            run.method.before_optimizer_step()
            run.optimizer.step()
            if run.method.ema is not None and not run.fused_ema:
                run.method.ema.update(momentum=self.momentum)
            self.static_loss.copy_(loss.detach())

    @contextlib.contextmanager
    def _device_scalars(self):
        run = self.run
        groups = run.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        ema = run.method.ema
        ema_step = None if ema is None else ema.step
        opt_momentum = getattr(run.optimizer, "ema_momentum_tensor", None)
        for g, t in zip(groups, self.lrs):
            g["lr"] = t
        if self.momentum is not None and run.fused_ema:
            run.optimizer.ema_momentum_tensor = self.momentum
        try:
            yield
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr
            if run.fused_ema:
                run.optimizer.ema_momentum_tensor = opt_momentum
            if ema is not None:
                ema.step = ema_step

    @contextlib.contextmanager
    def _on_side_stream(self):
        if self.side_stream is None:
            yield
            return
        current = torch.cuda.current_stream(self.run.device)
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            yield
        current.wait_stream(self.side_stream)
