"""`sf.nn` as a drop-in for lightly's losses: lightly's argument order and meanings, its memory bank, DINO's
teacher-temperature schedule, and the rules for when a queue or memory bank takes a step's keys."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sslfast as sf
from sslfast.reference.dino import dino_loss_literal
from helpers import assert_close, assert_loss_close, leaf


# ------------------------------------------------------------------------------- NTXentLoss memory bank
def _lightly_bank_loss(out0, out1, bank, temperature):
    """lightly NTXentLoss with a memory bank, written from its definition (float64): logits
    [norm(out0)·norm(out1), norm(out0) bankᵀ]/τ, label 0, cross-entropy averaged over the batch."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    logits = torch.cat([(out0 * out1).sum(1, keepdim=True), out0 @ bank.T], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(out0.shape[0], dtype=torch.long))


def _lightly_enqueue(bank, ptr, keys):
    """lightly MemoryBankModule._dequeue_and_enqueue: a batch reaching the end fills the bank up to it, the
    rest is dropped and the pointer returns to 0."""
    size = bank.shape[0]
    if ptr + keys.shape[0] >= size:
        bank[ptr:] = keys[: size - ptr]
        return 0
    bank[ptr : ptr + keys.shape[0]] = keys
    return ptr + keys.shape[0]


def test_ntxent_memory_bank_matches_lightly(backend, seed):
    """`NTXentLoss(τ, (K, D))`: lightly's bank (same initial draw for the same seed), loss and gradients over
    steps whose batches do not divide K, and a state-dict round trip in the middle."""
    k_size, n, d, tau = 13, 5, 12, 0.3
    torch.manual_seed(seed)
    module = sf.nn.NTXentLoss(tau, (k_size, d))
    torch.manual_seed(seed)
    bank, ptr = F.normalize(torch.randn(k_size, d), dim=1).double(), 0  # lightly's initialization
    assert_close(module.memory_bank.queue, bank, 1e-6, f"initial bank (seed {seed})")
    for step in range(5):
        out0, out1 = torch.randn(n, d), torch.randn(n, d)
        a, b = leaf(out0), leaf(out1)
        loss = module(a, b)
        loss.backward()
        a64, b64 = leaf(out0, torch.float64), leaf(out1, torch.float64)
        want = _lightly_bank_loss(a64, b64, bank, tau)
        want.backward()
        assert_loss_close(loss, want, 1e-5, f"step {step} (seed {seed})")
        assert_close(a.grad, a64.grad, 1e-5, f"grad out0, step {step} (seed {seed})")
        assert_close(b.grad, b64.grad, 1e-5, f"grad out1, step {step} (seed {seed})")
        ptr = _lightly_enqueue(bank, ptr, F.normalize(out1.double(), dim=1))
        if step == 2:
            clone = sf.nn.NTXentLoss(tau, (k_size, d))
            clone.load_state_dict(module.state_dict())
            module = clone
    module.memory_bank.flush()
    assert_close(module.memory_bank.queue, bank, 1e-6, f"bank contents (seed {seed})")


def test_ntxent_int_bank_size_is_lazy(seed):
    """An int K (lightly < 1.6) takes D from the first batch and behaves as (K, D) drawn at that point."""
    lazy, eager = sf.nn.NTXentLoss(0.5, 7), None
    for step in range(3):
        out0, out1 = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
        state = torch.get_rng_state()
        got = lazy(out0, out1)
        if eager is None:
            torch.set_rng_state(state)
            eager = sf.nn.NTXentLoss(0.5, (7, 5))
        assert_loss_close(got, eager(out0, out1), 1e-6, f"step {step} (seed {seed})")
    assert lazy.memory_bank.queue.shape == (7, 5)


def test_ntxent_without_bank_has_no_state():
    assert sf.nn.NTXentLoss(0.5, 0).state_dict() == {}
    assert sf.nn.NTXentLoss(0.5, (0, 8)).memory_bank is None


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((0.5, True), TypeError, "memory_bank_size"),  # sslfast's old second argument, gather_distributed
        ((0.5, (8,)), TypeError, "memory_bank_size"),
        ((0.5, 8.0), TypeError, "memory_bank_size"),
        ((0.5, -1), ValueError, "memory_bank_size"),
        ((0.5, (8, 0)), ValueError, "memory_bank_size"),
        ((-0.5,), ValueError, "temperature"),  # lightly allows a negative τ
        ((0.5, 0, 1), TypeError, "gather_distributed"),
    ],
)
def test_ntxent_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        sf.nn.NTXentLoss(*args)


# ------------------------------------------------------------------------------- when queues update
def _queue_after(module, bank, out0, out1, *, train: bool, grad: bool):
    """The module's queue (flushed) after one call in the given mode; `bank` is the queue-holding module."""
    module.train(train)
    with torch.set_grad_enabled(grad):
        module(out0, out1)
    bank.flush()
    return bank.queue.clone()


@pytest.mark.parametrize("kind", ["NTXentLoss", "InfoNCELoss"])
def test_queue_updates_only_in_training_with_grad(seed, kind):
    d = 6
    if kind == "NTXentLoss":
        module = sf.nn.NTXentLoss(0.5, (9, d))
        bank = module.memory_bank
    else:
        module = bank = sf.nn.InfoNCELoss(0.2, 9, d)
    before = bank.queue.clone()
    out0, out1 = torch.randn(4, d, requires_grad=True), torch.randn(4, d)
    assert torch.equal(_queue_after(module, bank, out0, out1, train=False, grad=True), before), "eval mode"
    assert torch.equal(_queue_after(module, bank, out0, out1, train=True, grad=False), before), "no_grad"
    with torch.inference_mode():
        module(out0, out1)
    bank.flush()
    assert torch.equal(bank.queue, before), "inference_mode"
    after = _queue_after(module, bank, out0, out1, train=True, grad=True)
    assert_close(after[:4], F.normalize(out1.detach(), dim=1), 1e-6, f"enqueued keys (seed {seed})")
    assert torch.equal(after[4:], before[4:])


def test_ntxent_bank_needs_out0_grad_as_lightly(seed):
    """lightly updates the bank only when out0 requires grad (a loss that will not be backpropagated)."""
    module = sf.nn.NTXentLoss(0.5, (9, 6))
    before = module.memory_bank.queue.clone()
    module(torch.randn(4, 6), torch.randn(4, 6))
    module.memory_bank.flush()
    assert torch.equal(module.memory_bank.queue, before)


@pytest.mark.parametrize("kind", ["NTXentLoss", "InfoNCELoss"])
def test_queue_float64(seed, kind, monkeypatch):
    """float64 inputs keep a float64 queue: the enqueued keys are not rounded through float32."""
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    d = 5
    module = sf.nn.NTXentLoss(0.5, (8, d)) if kind == "NTXentLoss" else sf.nn.InfoNCELoss(0.2, 8, d)
    bank = module.memory_bank if kind == "NTXentLoss" else module
    out0 = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    out1 = torch.randn(3, d, dtype=torch.float64)
    module(out0, out1)
    second = module(out0, out1)
    assert second.dtype == torch.float64 and bank.queue.dtype == torch.float64
    assert torch.allclose(bank.queue[:3], F.normalize(out1, dim=1), rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------- DINOLoss
def _dino_inputs(G=2, V=4, B=3, K=16):
    return [torch.randn(B, K) for _ in range(G)], [torch.randn(B, K) for _ in range(V)]


def _want(teacher, student, teacher_temp):
    t, s = torch.cat(teacher).double(), torch.cat(student).double()
    return dino_loss_literal(s, t, torch.zeros(1, t.shape[1], dtype=torch.float64), 0.1, teacher_temp, len(teacher))


@pytest.mark.parametrize("W", [1, 2, 7, 30])
def test_dino_schedule_is_main_dino(seed, W):
    """main_dino.py's teacher temperature at every epoch (and inside it): τ_t reaches teacher_temp at
    epoch W - 1 (W > 1)."""
    nepochs, warm, final = W + 3, 0.04, 0.07
    schedule = np.concatenate((np.linspace(warm, final, W), np.ones(nepochs - W) * final))
    crit = sf.nn.DINOLoss(16, warmup_teacher_temp=warm, teacher_temp=final, warmup_teacher_temp_epochs=W)
    for epoch in range(nepochs):
        assert crit.teacher_temperature(epoch) == schedule[epoch], f"epoch {epoch}"
        assert crit.teacher_temperature(epoch + 0.7) == schedule[epoch], f"epoch {epoch}.7"
    assert crit.teacher_temperature(None) == final
    teacher, student = _dino_inputs()
    crit.eval()
    got = crit(teacher, student, epoch=W - 1)
    assert_loss_close(got, _want(teacher, student, schedule[W - 1]), 1e-5, f"seed {seed}")


def test_dino_third_argument_is_teacher_temp(seed):
    """forward(teacher_out, student_out, teacher_temp, epoch) as lightly >= 1.5."""
    crit = sf.nn.DINOLoss(16, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=10).eval()
    teacher, student = _dino_inputs()
    assert_loss_close(crit(teacher, student, 0.07), _want(teacher, student, 0.07), 1e-5, f"seed {seed}")
    assert_loss_close(crit(teacher, student, teacher_temp=0.06), _want(teacher, student, 0.06), 1e-5)
    assert_loss_close(crit(teacher, student, epoch=0), _want(teacher, student, 0.04), 1e-5)
    with pytest.raises(TypeError, match="teacher_temp"):
        crit(teacher, student, 5)  # older lightly: the epoch
    with pytest.raises(ValueError, match="teacher_temp or epoch"):
        crit(teacher, student, 0.07, epoch=3)
    with pytest.raises(ValueError, match="epoch"):
        crit(teacher, student, epoch=-1)


def test_dino_constructor_order_is_lightlys(seed):
    """The seventh argument is lightly's center_mode; num_global_crops is keyword-only."""
    crit = sf.nn.DINOLoss(16, 0.04, 0.04, 0, 0.1, 0.9, "mean").eval()
    teacher, student = _dino_inputs()
    assert_loss_close(crit(torch.cat(teacher), torch.cat(student)), _want(teacher, student, 0.04), 1e-5)
    with pytest.raises(ValueError, match="center_mode"):
        sf.nn.DINOLoss(16, 0.04, 0.04, 0, 0.1, 0.9, 2)
