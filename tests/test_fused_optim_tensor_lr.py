"""A learning rate and an EMA momentum given as 0-dim float32 tensors (read on the device: what makes
`AdamWEMA` / `LARSEMA` steps capturable in a CUDA graph with a schedule) in `sf.ops.adamw_ema_step_`,
`sf.ops.lars_ema_step_`, their plans and the optimizers.

CPU: several steps with a tensor lr re-filled from a cosine schedule equal, bit for bit, the float run with the
same (fp32) values; likewise `ema_momentum_tensor`; bad tensors raise naming the argument before any update;
LambdaLR fills a tensor lr in place; the csrc launcher passes the tensor's address. GPU (`-m gpu`): the steps
captured in a CUDA graph and replayed with new values filled in between equal eager float-lr optimizers.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sslfast as sf
from sslfast.ops._csrc import ema as C
from sslfast.ops.fused_optim import AdamWEMAPlan, LARSEMAPlan
from sslfast.optim import AdamWEMA, LARSEMA

from ema_testing import mlp
from helpers import assert_close

STEPS = 5
MOMENTA = [0.5, 0.875, 0.25, 0.75, 0.625]  # exact in fp32, far from any EMA schedule


def _fp32(x: float) -> float:
    """The value a float32 tensor filled with x holds."""
    return float(torch.tensor(x, dtype=torch.float32))


def _lr(k: int, base: float) -> float:
    """A cosine schedule with warm-up (strongly varying over STEPS), rounded to fp32."""
    return _fp32(base * (k + 1) / 2 if k < 2 else base * 0.5 * (1 + math.cos(math.pi * k / STEPS)))


def _setup(kind, dtype, teacher_kind, lr_tensor: bool, state):
    """(model, optimizer, teacher) for one run; lr tensors in both groups when `lr_tensor`."""
    model = mlp().to(dtype)
    model.load_state_dict(state)
    params = list(model.parameters())
    lr = (lambda v: torch.tensor(v)) if lr_tensor else (lambda v: v)  # noqa: E731
    if kind == "adamw":
        groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0, "lr": lr(3e-3)}]
        make = lambda teacher, **kw: AdamWEMA(groups, teacher=teacher, lr=lr(1e-2), betas=(0.8, 0.95), **kw)  # noqa: E731
    else:  # group 0: biases and norms excluded from decay and adaptation; group 1: nothing excluded
        groups = [{"params": params[:4]}, {"params": params[4:], "exclude": None, "lr": lr(0.1)}]
        make = lambda teacher, **kw: LARSEMA(groups, teacher=teacher, lr=lr(0.3), weight_decay=1e-2, eta=2e-2, **kw)  # noqa: E731
    if teacher_kind == "ema":
        teacher = sf.EMA(model, momentum=0.5, total_steps=STEPS)
        opt = make(teacher)
    else:
        teacher = [p.detach().clone().float() for p in params]
        opt = make(teacher, ema_momentum=0.9)
    return model, opt, teacher


def _teacher_tensors(teacher):
    return [p.detach() for p in teacher.teacher.parameters()] if isinstance(teacher, sf.EMA) else teacher


def _train(model, opt, *, fill, seed):
    """STEPS optimizer steps with fixed gradients; `fill(k)` sets this step's lr / momentum first."""
    params = list(model.parameters())
    g = torch.Generator().manual_seed(seed)
    for k in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        if k == 2:  # no gradient: not stepped, its teacher still follows it
            params[1].grad = None
        fill(k)
        opt.step()


def _assert_same_runs(a, b, what, bound=None):
    """Equal params, optimizer states and teachers: bit for bit, or (bound) to that relative error."""

    def same(x, y, item):
        if bound is None:
            assert torch.equal(x, y), f"{what}: {item}"
        else:
            assert_close(x.float(), y.float(), bound, f"{what}: {item}")

    (ma, oa, ta), (mb, ob, tb) = a, b
    for i, (x, y) in enumerate(zip(ma.parameters(), mb.parameters())):
        same(x, y, f"param {i}")
        for name, s in oa.state[x].items():
            same(s, ob.state[y][name], f"state {name} of param {i}")
    for i, (x, y) in enumerate(zip(_teacher_tensors(ta), _teacher_tensors(tb))):
        same(x, y, f"teacher {i}")


def _fill_lr(opt, tensor: bool):
    bases = [_fp32(g["lr"]) if not tensor else float(g["lr"]) for g in opt.param_groups]

    def fill(k):
        for group, base in zip(opt.param_groups, bases):
            if tensor:
                group["lr"].fill_(_lr(k, base))
            else:
                group["lr"] = _lr(k, base)

    return fill


@pytest.mark.parametrize("kind", ["adamw", "lars"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher_kind", ["ema", "list"])
def test_tensor_lr_refilled_each_step_equals_float_lr(seed, kind, dtype, teacher_kind):
    state = mlp().to(dtype).state_dict()
    runs = []
    for tensor in (False, True):
        model, opt, teacher = _setup(kind, dtype, teacher_kind, tensor, state)
        lr_tensors = [g["lr"] for g in opt.param_groups] if tensor else []
        _train(model, opt, fill=_fill_lr(opt, tensor), seed=seed)
        assert all(g["lr"] is t for g, t in zip(opt.param_groups, lr_tensors)), "the step replaced a tensor lr"
        runs.append((model, opt, teacher))
    _assert_same_runs(*runs, f"{kind} {dtype} {teacher_kind} (seed {seed})")
    moved = [not torch.equal(p, q.to(dtype)) for p, q in zip(runs[0][0].parameters(), state.values())]
    assert all(moved), "every parameter was stepped"


@pytest.mark.parametrize("kind", ["adamw", "lars"])
@pytest.mark.parametrize("teacher_kind", ["ema", "list"])
def test_ema_momentum_tensor_equals_float_momentum(seed, kind, teacher_kind):
    """The tensor run (its EMA schedule overridden by the tensor) against a run with a list teacher and the
    same momenta as floats; the tensor is filled by the caller and never written by `step()`."""
    state = mlp().state_dict()
    model, opt, teacher = _setup(kind, torch.float32, teacher_kind, False, state)
    m = torch.zeros(())
    opt.ema_momentum_tensor = m

    def fill_tensor(k):
        m.fill_(MOMENTA[k])

    _train(model, opt, fill=fill_tensor, seed=seed)
    assert opt.ema_momentum_tensor is m and float(m) == MOMENTA[-1], "step() must not write the tensor"
    if teacher_kind == "ema":
        assert teacher.step == STEPS, "the EMA still counts its steps"
    # the reference: a list teacher starting, as the EMA's, as a copy of the student
    ref_model, ref_opt, ref_teacher = _setup(kind, torch.float32, "list", False, state)

    def fill_float(k):
        ref_opt.ema_momentum = MOMENTA[k]

    _train(ref_model, ref_opt, fill=fill_float, seed=seed)
    _assert_same_runs((model, opt, teacher), (ref_model, ref_opt, ref_teacher), f"{kind} {teacher_kind} ({seed})")


# ------------------------------------------------------------------------------------------ bad tensors
def _adamw_args(n=2):
    params = [torch.randn(5, 3), torch.randn(7)][:n]
    return (
        params,
        [torch.randn_like(p) for p in params],
        [torch.zeros_like(p) for p in params],
        [torch.zeros_like(p) for p in params],
        [torch.zeros(()) for _ in params],
    )


BAD_LR = [
    (torch.tensor(0.1, dtype=torch.float64), TypeError),
    (torch.tensor([0.1]), TypeError),
    (torch.tensor(1, dtype=torch.int32), TypeError),
    ("0.1", TypeError),
    (torch.tensor(0.1, device="meta"), ValueError),  # not the params' device
    (torch.tensor(-0.1), RuntimeError),  # range: checked where the tensor lives (here at once, on the CPU)
    (torch.tensor(float("nan")), RuntimeError),
    (torch.tensor(float("inf")), RuntimeError),
]


@pytest.mark.parametrize("bad, error", BAD_LR)
def test_bad_tensor_lr_raises_naming_lr_before_any_update(bad, error):
    params, grads, m, v, steps = _adamw_args()
    before = [p.clone() for p in params]
    mus = [torch.zeros_like(p) for p in params]
    with pytest.raises(error, match="lr"):
        sf.ops.adamw_ema_step_(params, grads, m, v, steps, lr=bad)
    with pytest.raises(error, match="lr"):
        sf.ops.lars_ema_step_(params, grads, mus, lr=bad)
    with pytest.raises(error, match="lr"):
        AdamWEMAPlan(params, m, v, steps, None).step_(
            params, grads, m, v, steps, None, lr=bad, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9
        )
    with pytest.raises(error, match="lr"):
        LARSEMAPlan(params, mus, None, [True, True], [True, True]).step_(
            params, grads, mus, None, lr=bad, momentum=0.9, weight_decay=0.0, eta=1e-3, ema_momentum=0.9
        )
    for cls in (AdamWEMA, LARSEMA):
        opt = cls(params, lr=torch.tensor(0.1))
        opt.param_groups[0]["lr"] = bad  # after the constructor's checks: the step checks it too
        for p, g in zip(params, grads):
            p.grad = g
        with pytest.raises(error, match="lr"):
            opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and all(float(s) == 0 for s in steps)
    assert all(not mu.any() for mu in mus)


@pytest.mark.parametrize("bad, error", [b for b in BAD_LR if b[1] is not RuntimeError])
def test_bad_tensor_lr_in_the_optimizer_constructor(bad, error):
    for cls in (AdamWEMA, LARSEMA):
        with pytest.raises(error, match="lr"):
            cls([torch.nn.Parameter(torch.randn(3))], lr=bad)


@pytest.mark.parametrize(
    "bad, error",
    [
        (torch.tensor(0.9, dtype=torch.float64), TypeError),
        (torch.tensor([0.9]), TypeError),
        (0.9, TypeError),
        (torch.tensor(0.9, device="meta"), ValueError),
    ],
)
def test_bad_ema_momentum_tensor_raises_naming_it(bad, error):
    params, grads = [torch.nn.Parameter(torch.randn(4, 3))], [torch.randn(4, 3)]
    teacher = [torch.randn(4, 3)]
    for cls in (AdamWEMA, LARSEMA):
        opt = cls(params, teacher=teacher)
        with pytest.raises(error, match="ema_momentum_tensor"):
            opt.ema_momentum_tensor = bad  # checked when set
        assert opt.ema_momentum_tensor is None
        opt._ema_momentum_tensor = bad  # and at each step
        params[0].grad = grads[0]
        before = params[0].detach().clone(), teacher[0].clone()
        with pytest.raises(error, match="ema_momentum_tensor"):
            opt.step()
        assert torch.equal(params[0], before[0]) and torch.equal(teacher[0], before[1])


def test_ema_momentum_tensor_out_of_range_raises():
    params, teacher = [torch.nn.Parameter(torch.randn(4, 3))], [torch.randn(4, 3)]
    opt = AdamWEMA(params, teacher=teacher)
    opt.ema_momentum_tensor = torch.tensor(1.5)
    params[0].grad = torch.randn(4, 3)
    with pytest.raises(ValueError, match="momentum"):
        opt.step()


# ------------------------------------------------------------------------------------------ schedulers
def test_lambda_lr_fills_the_same_tensor_lr(seed):
    """torch's LR schedulers write a tensor lr in place (`_update_param_group_val`): the optimizer keeps
    reading the very tensor, now holding the scheduled value, and steps as the float-lr run to fp32 rounding."""
    state = mlp().state_dict()
    factor = lambda k: [1.0, 0.25, 2.0, 0.5, 1.5, 0.75][k]  # noqa: E731
    runs = []
    for tensor in (False, True):
        model, opt, teacher = _setup("adamw", torch.float32, "list", tensor, state)
        lrs = [g["lr"] for g in opt.param_groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

        def fill(k, opt=opt, lrs=lrs, tensor=tensor, sched=sched):
            if k:
                sched.step()
            if tensor:
                assert all(g["lr"] is t for g, t in zip(opt.param_groups, lrs)), "LambdaLR replaced the tensor"
                assert float(opt.param_groups[0]["lr"]) == _fp32(1e-2 * factor(k))

        _train(model, opt, fill=fill, seed=seed)
        runs.append((model, opt, teacher))
    _assert_same_runs(*runs, f"LambdaLR (seed {seed})", bound=1e-6)


# ------------------------------------------------------------------------------------------ no host reads
class _HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor value to the host (`.item()`, `float(t)`, `bool(t)`)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["adamw", "lars"])
def test_tensor_lr_adds_no_host_read(seed, kind):
    """A tensor lr is never read on the host: the tensor run reads exactly the values the float run reads
    (LARS: none; the CPU AdamW: its step counts, as torch's foreach AdamW does). A CPU momentum tensor is a
    host scalar and read as one; a CUDA one is read by the kernels (the GPU graph test)."""
    state = mlp().state_dict()
    counts = []
    for tensor in (False, True):
        model, opt, _ = _setup(kind, torch.float32, "ema", tensor, state)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()  # builds the plans
        with _HostReads() as reads:
            opt.step()
        counts.append(reads.count)
    assert counts[1] == counts[0] == (0 if kind == "lars" else len(list(model.parameters()))), counts


# ------------------------------------------------------------------------------------------ csrc launcher
@pytest.mark.parametrize("tensor", [False, True])
def test_csrc_launcher_passes_lr_or_its_address(monkeypatch, tensor):
    """`sslfast._C` replaced by a recorder: (lr, 0) for a float, (0.0, lr.data_ptr()) for a tensor, in the
    binding's argument order (table, param_dtype, teacher_dtype, [partials_ptr,] lr, lr_ptr, ...)."""
    calls = []
    names = ("adamw_ema_apply", "lars_ema_apply")
    ext = type("Ext", (), {n: staticmethod(lambda *a, n=n: calls.append((n, a))) for n in names})
    monkeypatch.setattr(C, "extension", lambda: ext)
    monkeypatch.setattr(C, "stream", lambda device: 0)
    params, grads, m, v, steps = _adamw_args()
    lr = torch.tensor(0.25) if tensor else 0.25
    want = (0.0, lr.data_ptr()) if tensor else (0.25, 0)
    plan = AdamWEMAPlan(params, m, v, steps, None)
    C.adamw_ema_step_(plan, params, grads, m, v, steps, [None, None], lr=lr, beta1=0.9, beta2=0.99, eps=1e-8,
                      weight_decay=0.0, weight=0.5, m_tensor=None)  # fmt: skip
    mus = [torch.zeros_like(p) for p in params]
    plan = LARSEMAPlan(params, mus, None, [True, True], [True, True])
    plan.tables[0].partials = torch.zeros(2 * plan.tables[0].n_chunks)  # allocated on CUDA only
    C.lars_ema_step_(plan, params, grads, mus, [None, None], lr=lr, momentum=0.9, weight_decay=0.0, eta=1e-3,
                     weight=0.5, m_tensor=None)  # fmt: skip
    assert [(n, a[3:5] if n == "adamw_ema_apply" else a[4:6]) for n, a in calls] == [
        ("adamw_ema_apply", want),
        ("lars_ema_apply", want),
    ]


# ------------------------------------------------------------------------------------------ GPU: CUDA graphs
def _cuda_pair(kind, seed):
    """(params, optimizer, teachers) twice from the same random state: a tensor-lr / momentum-tensor
    optimizer and an eager float one; odd sizes, a 1-D LARS-excluded bias."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 3, 3, 3), (37,), (129, 65), (65,), (48, 37)]
    init = [torch.randn(s, generator=g) for s in shapes]
    out = []
    for graph in (True, False):
        params = [torch.nn.Parameter(x.clone().cuda()) for x in init]
        teachers = [x.clone().cuda() for x in init]
        lr = torch.tensor(0.0, device="cuda") if graph else 0.0
        if kind == "adamw":
            groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}]
            opt = AdamWEMA(groups, teacher=teachers, lr=lr, betas=(0.8, 0.95))
        else:
            opt = LARSEMA(params, teacher=teachers, lr=lr, weight_decay=1e-2, eta=2e-2)
        if graph:
            opt.ema_momentum_tensor = torch.tensor(0.0, device="cuda")
        out.append((params, opt, teachers))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adamw", "lars"])
def test_gpu_step_captured_with_tensor_lr_and_momentum(seed, kind):
    """Two eager warm-up steps on a side stream, one capture, three replays with new lr / momentum values
    filled in between: equal to an eager float-lr optimizer given the same values (fp32 tolerance)."""
    (params, opt, teachers), (ref_params, ref, ref_teachers) = _cuda_pair(kind, seed)
    lr_t, m_t = opt.param_groups[0]["lr"], opt.ema_momentum_tensor
    for group in opt.param_groups[1:]:
        group["lr"] = lr_t  # one tensor shared by the groups
    grads = [torch.randn_like(p) for p in params]  # static: the graph reads these tensors at replay
    for p, rp, gr in zip(params, ref_params, grads):
        p.grad, rp.grad = gr, gr.clone()
    schedule = [(_fp32(0.3 if kind == "lars" else 1e-2) * f, m) for f, m in zip([1.0, 0.5, 2.0, 0.25, 0.75], MOMENTA)]

    def eager_ref(k):
        lr, m = schedule[k]
        for group in ref.param_groups:
            group["lr"] = lr
        ref.ema_momentum = m
        ref.step()

    def fill(k):
        lr_t.fill_(schedule[k][0])
        m_t.fill_(schedule[k][1])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(2):
            fill(k)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for k in range(2):
        eager_ref(k)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for k in range(2, STEPS):
        fill(k)
        graph.replay()
        eager_ref(k)
    torch.cuda.synchronize()
    if kind == "adamw":
        assert float(opt.state[params[0]]["step"]) == STEPS
    for i, (p, rp) in enumerate(zip(params, ref_params)):
        assert_close(p, rp, 1e-5, f"{kind} param {i} after graph replays (seed {seed})")
    for i, (t, rt) in enumerate(zip(teachers, ref_teachers)):
        assert_close(t, rt, 1e-5, f"{kind} teacher {i} after graph replays (seed {seed})")
    assert float(lr_t) == schedule[-1][0] and float(m_t) == schedule[-1][1], "replays must not write them"
