"""2 gloo ranks against one process on the whole batch, for the ops DINOv2 and SwAV run on every rank.

What each op promises across ranks (their docstrings; DINOv2 / SwAV do the same):
  * `sf.sinkhorn_knopp(..., gather_distributed=True)`: the normalization runs over the global batch (all-reduced
    sums), so each rank's targets are its rows of the single-process targets of the concatenated batch.
  * `sf.swav_loss`, `sf.ibot_patch_loss`: no collective; each is a mean over the rank's images, so with equal
    shards the mean of the ranks' losses is the whole-batch loss, and each rank's gradient on its rows, divided
    by the world size (DDP's gradient average), is the whole-batch gradient on those rows. SwAV's codes come
    from the distributed Sinkhorn above.
  * `sf.koleo_loss`: per rank, as in DINOv2 (each rank's nearest neighbours among its own rows): each rank's
    loss and gradient are those of the single-process loss on that rank's rows — not of the whole batch.
The ranks compute in fp32, the single process in fp64 on the same numbers.
"""

import pytest
import torch
from distributed_harness import run_ranks

import sslfast as sf

B, K, D, L, V, G, WORLD = 5, 7, 9, 6, 4, 2, 2  # B images per rank, V crops of which G global


def _inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = B * WORLD
    return {
        "logits": torch.randn(n, K, generator=g) * 3,
        "scores": torch.randn(V, n, K, generator=g),  # crop-major, every image of the batch
        "student": torch.randn(n, L, K, generator=g),
        "teacher": torch.softmax(torch.randn(n, L, K, generator=g), -1),
        "mask": torch.rand(n, L, generator=g) < 0.4,
        "feats": torch.randn(n, D, generator=g),
    }


def _ops(x: dict, *, gather: bool) -> dict:
    """Every op on the batch `x` (a rank's rows, or all of them): values and input gradients."""
    out = {"sinkhorn": sf.sinkhorn_knopp(x["logits"], 0.05, 3, gather_distributed=gather)}
    scores = x["scores"].clone().requires_grad_(True)
    codes = torch.cat([sf.sinkhorn_knopp(scores[c].detach(), 0.05, 3, gather_distributed=gather) for c in range(G)])
    swav = sf.swav_loss(scores.reshape(-1, K), codes, temperature=0.1, num_global_crops=G)
    swav.backward()
    student = x["student"].clone().requires_grad_(True)
    ibot = sf.ibot_patch_loss(student, x["teacher"], x["mask"], student_temp=0.1)
    ibot.backward()
    feats = x["feats"].clone().requires_grad_(True)
    koleo = sf.koleo_loss(feats)
    koleo.backward()
    out.update(
        swav=swav.detach(),
        swav_grad=scores.grad,
        ibot=ibot.detach(),
        ibot_grad=student.grad,
        koleo=koleo.detach(),
        koleo_grad=feats.grad,
    )
    return out


def _rows(x: dict, rank: int) -> dict:
    r = slice(rank * B, (rank + 1) * B)
    return {k: v[:, r] if k == "scores" else v[r] for k, v in x.items()}


def _rank_fn(rank, world, x):
    return _ops(_rows(x, rank), gather=True)


def _double(x: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in x.items()}


@pytest.mark.slow
def test_two_ranks_equal_one_process():
    x = _inputs(seed=21)
    ranks = run_ranks(WORLD, _rank_fn, x, timeout=150)
    whole = _ops(_double(x), gather=False)
    close = dict(rtol=1e-5, atol=1e-6)
    for r, got in enumerate(ranks):
        rows = slice(r * B, (r + 1) * B)
        # Sinkhorn: the rank's rows of the global targets (and not the rank's own normalization)
        torch.testing.assert_close(got["sinkhorn"].double(), whole["sinkhorn"][rows], **close)
        local = sf.sinkhorn_knopp(_rows(x, r)["logits"], 0.05, 3)
        assert (local - got["sinkhorn"]).abs().max() > 1e-3, "the distributed targets must differ from local ones"
        # SwAV / iBOT: gradients on the rank's rows, averaged over ranks, are the whole batch's
        torch.testing.assert_close(got["swav_grad"].double() / WORLD, whole["swav_grad"][:, rows], **close)
        torch.testing.assert_close(got["ibot_grad"].double() / WORLD, whole["ibot_grad"][rows], **close)
        # KoLeo: per rank, the single-process loss of the rank's rows
        own = _ops(_double(_rows(x, r)), gather=False)
        torch.testing.assert_close(got["koleo"].double(), own["koleo"], **close)
        torch.testing.assert_close(got["koleo_grad"].double(), own["koleo_grad"], **close)
        assert abs(got["koleo"].item() - whole["koleo"].item()) > 1e-4  # the whole batch's KoLeo is another loss
    for name in ("swav", "ibot"):
        mean = sum(got[name].double() for got in ranks) / WORLD
        torch.testing.assert_close(mean, whole[name], **close, msg=lambda m: f"{name}: {m}")
