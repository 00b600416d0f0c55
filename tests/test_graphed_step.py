"""`sslfast pretrain --cuda-graph` (`sslfast.train.graphed.GraphedStep`).

On the CPU a stand-in graph (`EagerReplay`) re-runs the captured step per replay: that checks the plumbing a real
replay depends on (the static input buffers, the learning rates and EMA momentum read from device tensors filled
before each replay, the host half of the step done after it) against the eager step, method by method. What a
re-run cannot see, a step that reads host state changing between steps (which a real replay would freeze), is
checked on the methods themselves: a capturable method's steps change no host attribute but the two step counts,
and its loss does not depend on them. The `gpu` tests capture for real."""

import copy
import dataclasses
import sys
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sslfast import _validate as V
from sslfast.methods import METHODS
from sslfast.train import setup
from sslfast.train.graphed import GraphedStep
from sslfast.train.step import build_model, train_step
from step_helpers import small_config, step_batches

CAPTURABLE = sorted(name for name, cls in METHODS.items() if cls.graph_refusal is None)
REFUSED = sorted(name for name, cls in METHODS.items() if cls.graph_refusal)
STEPS = 5
COUNTERS = {"global_step", "step"}  # Method.global_step, EMA.step: advanced by the graph step's host half


class EagerReplay:
    """A CUDA graph's stand-in: `capture` keeps the step and runs nothing (a capture computes nothing either);
    `replay` runs it again."""

    def __init__(self):
        self.fn, self.replays = None, 0

    def capture(self, fn):
        self.fn = fn

    def replay(self):
        self.replays += 1
        self.fn()


def _state(run) -> dict:
    """Every parameter and buffer of the method, the teacher's included, and the optimizer's state."""
    out = {f"method.{k}": v.detach().clone() for k, v in run.method.state_dict().items() if torch.is_tensor(v)}
    for i, (p, st) in enumerate(run.optimizer.state.items()):
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"opt.{i}.{k}"] = v.detach().clone()
    return out


def _train(run, batches, seed: int) -> list[float]:
    torch.manual_seed(seed)  # the same draws (MAE's masks) on both runs
    return [float(train_step(run, views)) for views in batches]


def _fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _fp32_schedule(run) -> None:
    """The run's learning rates rounded to fp32 after every scheduler step, and its EMA momentum rounded to fp32:
    the values the graph step's device tensors hold. (AdamW turns the rounding noise of a gradient that is zero
    in exact arithmetic, such as an attention key bias's, into lr-sized updates, so one ulp of lr apart the runs
    would drift visibly; an unrounded momentum moves the teacher by an ulp, which a few steps of a contrastive
    loss amplify past the tolerance.)"""
    ema = run.method.ema
    if ema is not None:
        scheduled = type(ema).momentum.fget
        ema.__class__ = type("RoundedEMA", (type(ema),), {"momentum": property(lambda self: _fp32(scheduled(self)))})
    step = run.scheduler.step

    def rounded_step():
        step()
        for group in run.optimizer.param_groups:
            group["lr"] = _fp32(group["lr"])

    run.scheduler.step = rounded_step
    for group in run.optimizer.param_groups:
        group["lr"] = _fp32(group["lr"])


@pytest.mark.parametrize("name", CAPTURABLE)
def test_replayed_step_trains_like_the_eager_step(name, seed):
    """STEPS steps of the graph step (one eager warm-up, then capture and replays) against STEPS eager steps on
    the same batches: the same losses, weights, teacher, optimizer state, schedules and step counts. The
    learning rate changes every step (warm-up, then the cosine over STEPS steps) and so does a cosine EMA
    momentum, so a replay reading last step's value, or a host half that did not advance a schedule, fails."""
    cfg = small_config(name)
    batches = step_batches(cfg, STEPS)
    eager = setup(cfg, steps_per_epoch=STEPS, device="cpu")
    graphed = setup(dataclasses.replace(cfg, cuda_graph=True), steps_per_epoch=STEPS, device="cpu")
    assert isinstance(graphed.graph, GraphedStep) and eager.graph is None
    graphed.graph.warmup, graphed.graph.graph_factory = 1, EagerReplay
    _fp32_schedule(eager)
    _fp32_schedule(graphed)  # its eager warm-up step too
    a = _train(eager, batches, seed)
    b = _train(graphed, batches, seed)
    assert graphed.graph.graph.replays == STEPS - 1
    # bit for bit: the replay runs the eager step's ops on the values the eager step uses (`_fp32_schedule`)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=0, msg=f"{name} losses")
    sa, sb = _state(eager), _state(graphed)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=f"{name}: {k}")
    assert graphed.method.global_step == eager.method.global_step == STEPS
    assert graphed.scheduler.last_epoch == eager.scheduler.last_epoch == STEPS
    for ga, gb in zip(eager.optimizer.param_groups, graphed.optimizer.param_groups):
        assert type(gb["lr"]) is float and gb["lr"] == ga["lr"]  # floats outside the capture
    if eager.method.ema is not None:
        assert graphed.method.ema.step == eager.method.ema.step == STEPS


# ops that make the host wait for a CUDA device: a value read back (`.item()`, `bool(t)`, `float(t)`) and the ops
# whose output size depends on the values
_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2", "unique_dim"}


def _in_host_scalar() -> bool:
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is V.host_scalar.__code__:
            return True
        frame = frame.f_back
    return False


class _HostReads(TorchDispatchMode):
    """Records the ops of `_SYNC_OPS` run under it, with their stacks, except the reads of a CPU argument check
    through `sslfast._validate.host_scalar` (which, on CUDA tensors, the runtime never makes)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _SYNC_OPS and not _in_host_scalar():
            self.reads.append(f"{func}\n" + "".join(traceback.format_stack(limit=10)[:-1]))
        return func(*args, **(kwargs or {}))


class RecordingReplay(EagerReplay):
    """`EagerReplay` whose replays record the host reads of the step (`_HostReads`)."""

    def __init__(self):
        super().__init__()
        self.mode = _HostReads()

    def replay(self):
        with self.mode:
            super().replay()


def _host_reads_of_the_captured_step(name: str) -> list[str]:
    cfg = small_config(name)
    run = setup(dataclasses.replace(cfg, cuda_graph=True), steps_per_epoch=STEPS, device="cpu")
    run.graph.warmup, run.graph.graph_factory = 1, RecordingReplay
    for views in step_batches(cfg, 3):
        train_step(run, views)
    return run.graph.graph.mode.reads


@pytest.mark.parametrize("name", CAPTURABLE)
def test_captured_step_reads_nothing_back_on_the_host(name):
    """A capture fails at the first read of a device value on the host (and a value-dependent output size is
    one): the captured step of a capturable method makes none, but the CPU-only argument checks."""
    reads = _host_reads_of_the_captured_step(name)
    assert not reads, reads[0]


def test_host_read_check_sees_a_read():
    """The check above can fail: DINOv2 draws its iBOT masks' seed back to the host (and it is refused)."""
    assert _host_reads_of_the_captured_step("dinov2") and METHODS["dinov2"].graph_refusal


def _host_attributes(module: nn.Module) -> dict:
    """The plain Python values (numbers, strings, None, tuples of them) every submodule holds, by path."""
    plain = (int, float, bool, str, type(None))
    out = {}
    for path, m in module.named_modules(remove_duplicate=False):
        for key, value in vars(m).items():
            if isinstance(value, plain) or (isinstance(value, tuple) and all(isinstance(v, plain) for v in value)):
                out[f"{path}.{key}"] = value
    return out


def _changed_host_attributes(name: str) -> set:
    cfg = small_config(name)
    run = setup(cfg, steps_per_epoch=STEPS, device="cpu")
    before = _host_attributes(run.method)
    for views in step_batches(cfg, 3):
        train_step(run, views)
    after = _host_attributes(run.method)
    return {k.rsplit(".", 1)[-1] for k in before if before[k] != after.get(k)}


@pytest.mark.parametrize("name", CAPTURABLE)
def test_capturable_method_keeps_no_other_host_state(name):
    """Steps of a method that declares no `graph_refusal` change no plain host value but the step counts."""
    assert _changed_host_attributes(name) <= COUNTERS


def test_host_state_check_sees_a_ring_position():
    """The check above can fail: MoCo v2's host-side queue position moves every step (and it is refused)."""
    assert "_ptr" in _changed_host_attributes("mocov2") and METHODS["mocov2"].graph_refusal


def _loss_at_step(method: nn.Module, views, step: int, seed: int) -> torch.Tensor:
    method.global_step = step
    if method.ema is not None:
        method.ema.step = step
    torch.manual_seed(seed)
    with torch.no_grad():
        return method(views)


def _loss_moves_with_the_step_count(name: str, seed: int, **overrides) -> bool:
    cfg = small_config(name)
    method = build_model(cfg, **overrides)
    method.configure(total_steps=100, steps_per_epoch=10)
    views = step_batches(cfg, 1)[0]
    early = _loss_at_step(copy.deepcopy(method), views, 0, seed)
    late = _loss_at_step(copy.deepcopy(method), views, 60, seed)
    return not torch.equal(early, late)


@pytest.mark.parametrize("name", CAPTURABLE)
def test_capturable_method_loss_ignores_the_step_counts(name, seed):
    """A replay does not re-read the step counts, so a capturable method's loss must not depend on them."""
    assert not _loss_moves_with_the_step_count(name, seed)


def test_step_count_check_sees_a_schedule():
    """The check above can fail: DINO's teacher temperature warms up with the step count (and it is refused)."""
    warm_up = dict(warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=5)
    assert _loss_moves_with_the_step_count("dino", 0, **warm_up) and METHODS["dino"].graph_refusal


def test_refusals_are_one_line_and_name_the_method():
    assert REFUSED and CAPTURABLE
    for name in REFUSED:
        why = METHODS[name].graph_refusal
        assert "\n" not in why and why.startswith(name), why


def test_views_of_another_shape_are_refused():
    cfg = small_config("simclr")
    run = setup(dataclasses.replace(cfg, cuda_graph=True), steps_per_epoch=STEPS, device="cpu")
    run.graph.warmup, run.graph.graph_factory = 0, EagerReplay
    batches = step_batches(cfg, 2)
    train_step(run, batches[0])
    with pytest.raises(ValueError, match="views: --cuda-graph replays the step captured for views"):
        train_step(run, [v[:4] for v in batches[1]])


# ---------------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["simclr", "byol", "simsiam"])
def test_gpu_captured_step_trains_like_the_eager_step(name, seed):
    """A real capture (fp32): STEPS replays after the warm-up and the capture equal the eager steps."""
    cfg = dataclasses.replace(small_config(name, "cuda"), precision="fp32")
    batches = step_batches(cfg, STEPS + 3, "cuda")
    eager = setup(cfg, steps_per_epoch=len(batches), device="cuda")
    graphed = setup(dataclasses.replace(cfg, cuda_graph=True), steps_per_epoch=len(batches), device="cuda")
    _fp32_schedule(eager)  # the lrs and EMA momentum the replay's fp32 device tensors hold (as on the CPU)
    _fp32_schedule(graphed)
    a = _train(eager, batches, seed)
    b = _train(graphed, batches, seed)
    torch.cuda.synchronize()
    assert graphed.graph.graph is not None
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    sa, sb = _state(eager), _state(graphed)
    for k in sa:
        torch.testing.assert_close(sb[k].float(), sa[k].float(), rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")


@pytest.mark.gpu
def test_gpu_captured_mae_draws_new_masks_every_replay():
    """MAE's masks come from the device generator, which each replay advances: the same batch replayed twice
    gives two different losses, both finite, and the weights move."""
    cfg = small_config("mae", "cuda")
    run = setup(dataclasses.replace(cfg, cuda_graph=True), steps_per_epoch=20, device="cuda")
    views = step_batches(cfg, 1, "cuda")[0]
    for _ in range(run.graph.warmup + 1):
        train_step(run, views)
    before = [p.detach().clone() for p in run.method.parameters()]
    losses = [float(train_step(run, views)) for _ in range(2)]
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[0] != losses[1]
    assert any(not torch.equal(p, q) for p, q in zip(before, run.method.parameters()))
