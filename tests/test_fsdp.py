"""`sslfast pretrain --strategy fsdp` (torch's FSDP2): 2 gloo ranks sharding student and EMA teacher step to the
weights of one process stepping on the whole batch; the checkpoint holds the whole model (resume, eval); the
flag's refusals are one line."""

import os

import pytest
import torch
from distributed_harness import run_ranks

from sslfast.cli import main
from sslfast.methods import METHODS
from sslfast.train import PretrainConfig, preset_for, pretrain, resolve, setup, train_step
from sslfast.train.fsdp import full_state


def _cfg(method, strategy="ddp", world=1, **kw):
    kw = {"batch_size": 8, **kw}
    return resolve(PretrainConfig(method=method, out="unused", workers=1, epochs=1, strategy=strategy, **kw), world)


def _views(method, batch, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 3, v.size, v.size, generator=g)
        for v in preset_for(_cfg(method, **kw), METHODS[method]).expanded()
    ]


def _steps(method, world, views, strategy, steps, kw):
    """The whole method state (student, teacher, buffers) after `steps` optimizer steps on `views`."""
    run = setup(_cfg(method, strategy, world, **kw), steps_per_epoch=4, device="cpu", world=world)
    assert run.sharded == (strategy == "fsdp" and world > 1)
    for _ in range(steps):
        train_step(run, views)
    if run.sharded:
        local = [p for p in run.method.parameters()]
        assert all(type(p).__name__ == "DTensor" for p in local)
        assert sum(p.to_local().numel() for p in local) < sum(p.numel() for p in local)  # sharded, not replicated
        state, _ = full_state(run.method, run.optimizer, rank0_only=False)
    else:
        state = run.method.state_dict()
    return {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


# (method, optimizer steps, seed, config overrides):
# * BYOL on resnet_tiny: stages sharded, LARS trust ratios over shards, global BN, EMA teacher; two steps.
# * SimCLR: no teacher, gathered negatives; two steps.
# * DINO on vit_micro: blocks of student and teacher sharded, center buffer; one step with SGD, because AdamW's
#   first steps divide by the gradient's own magnitude, which turns last-bit summation-order differences of
#   near-zero gradients into visible ones (DDP differs from one process by the same amount there).
PARITY_CASES = [
    ("byol", 2, 11, {}),
    ("simclr", 2, 12, {}),
    ("dino", 1, 13, dict(backbone="vit_micro", optimizer="sgd")),
]


def _rank_fn(rank, world, cases):
    out = []
    for method, steps, views, kw in cases:
        n = views[0].shape[0] // world
        out.append(_steps(method, world, [v[rank * n : (rank + 1) * n] for v in views], "fsdp", steps, kw))
    return out


@pytest.mark.slow
def test_fsdp_steps_equal_one_process():
    """Student and EMA teacher after the steps on 2 ranks × 4 images equal one process on the 8 images, for each
    of `PARITY_CASES` (one pair of worker processes runs them all)."""
    cases = [(method, steps, _views(method, 8, seed, **kw), kw) for method, steps, seed, kw in PARITY_CASES]
    ranks = run_ranks(2, _rank_fn, cases, timeout=300)
    for i, (method, steps, views, kw) in enumerate(cases):
        single = _steps(method, 1, views, "ddp", steps, kw)
        assert set(ranks[0][i]) == set(single), method
        assert any(k.startswith("ema.teacher.") for k in single) == (method != "simclr")  # the teacher is compared
        for rank_states in ranks:
            for key, want in single.items():
                got = rank_states[i][key]
                if key.endswith("num_batches_tracked"):
                    assert torch.equal(got, want), f"{method} {key}"
                    continue
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{method} {key}: {m}")


def _pretrain_fn(rank, world, out):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    base = dict(
        method="byol",
        out=out,
        batch_size=64,
        image_size=8,
        workers=1,
        device="cpu",
        strategy="fsdp",
        knn=False,
        progress=False,
    )
    first = pretrain(PretrainConfig(epochs=2, stop_after=1, **base), log=lambda s: None)
    second = pretrain(
        PretrainConfig(epochs=2, resume=True, **{k: v for k, v in base.items() if k != "strategy"}), log=lambda s: None
    )
    return first["finished"], second["finished"], second["config"]["strategy"]


@pytest.mark.slow
def test_fsdp_pretrain_checkpoint_resumes_and_evaluates(tmp_path):
    """A 2-rank FSDP run writes a whole-model checkpoint, resumes from it (the saved strategy is kept), and
    `sslfast eval` loads it into an unsharded model."""
    out = str(tmp_path / "run")
    ranks = run_ranks(2, _pretrain_fn, out, timeout=200)
    assert all(r == (False, True, "fsdp") for r in ranks), ranks
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert state["epoch"] == 2 and state["config"]["strategy"] == "fsdp"
    assert all(type(v) is torch.Tensor for v in state["method"].values() if isinstance(v, torch.Tensor))
    assert isinstance(next(iter(state["optimizer"]["state"])), str)  # keyed by parameter name
    single = setup(_cfg("byol", image_size=8, batch_size=64), steps_per_epoch=1, device="cpu").method
    assert set(state["method"]) == set(single.state_dict())
    for key, value in single.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert state["method"][key].shape == value.shape, key
    from sslfast.train import evaluate

    res = evaluate(out, protocols=("knn",), log=lambda s: None)
    assert 0.0 <= res["pretrained"]["knn"] <= 1.0


def test_fsdp_world_one_is_the_plain_step():
    """One process with --strategy fsdp runs the unsharded step (nothing to shard), bit for bit."""
    views = _views("byol", 8, seed=5)
    a = _steps("byol", 1, views, "fsdp", 1, {})
    b = _steps("byol", 1, views, "ddp", 1, {})
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--strategy", "zero3"], "--strategy must be ddp or fsdp, got 'zero3'"),
        (["--strategy", "fsdp", "--method", "swav"], "--strategy fsdp: swav rescales its prototypes"),
    ],
)
def test_cli_strategy_refusals_are_one_line(argv, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--out", str(tmp_path / "r"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not os.path.exists(tmp_path / "r" / "checkpoint.pt")


def test_strategy_is_not_changed_on_resume():
    from sslfast.train.config import RESUMABLE

    assert "strategy" not in RESUMABLE
    with pytest.raises(ValueError, match="--strategy"):
        resolve(PretrainConfig(strategy="FSDP"))
