"""Every fused op, forward and backward, captures in a CUDA graph: no host sync, no host-side branch on
device data, no allocation that escapes the graph's pool. This is what closes the host-overhead gap of the
small ops (`benchmarks/RESULTS.md`, "graphed" column) under torch.compile(mode="reduce-overhead") or a
hand-captured training step. Each case captures a call once, writes fresh values into its inputs in place,
replays, and compares with an eager call on those values, so a replay that reused stale results would fail."""

import pytest
import torch

import sslfast as sf
from sslfast import bench, mae

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _leaves(*shapes, dtype=torch.bfloat16):
    return [torch.randn(*s, device=DEV, dtype=dtype, requires_grad=True) for s in shapes]


def _with_grads(loss_fn, leaves):
    """A call returning [loss, grad of each leaf] (fresh copies) of one forward + backward."""

    def call():
        for t in leaves:
            t.grad = None
        loss = loss_fn()
        loss.backward()
        return [loss.detach().clone()] + [t.grad.clone() for t in leaves]

    return call


# name -> builder of (inputs to refresh in place, call returning the tensors to compare); builders run on the
# device inside the test, so collection needs no CUDA
CASES = {}


def _case(name):
    def wrap(fn):
        CASES[name] = fn
        return fn

    return wrap


@_case("nt_xent")
def _nt_xent():
    z1, z2 = _leaves((300, 96), (300, 96))
    return [z1, z2], _with_grads(lambda: sf.nt_xent_loss(z1, z2, 0.2), [z1, z2])


@_case("info_nce queue")
def _info_nce_queue():
    q, k = _leaves((200, 64), (200, 64))
    queue = torch.randn(1000, 64, device=DEV, dtype=torch.bfloat16)
    return [q, k, queue], _with_grads(lambda: sf.info_nce_loss(q, k, queue, 0.2), [q, k])


@_case("clip")
def _clip():
    img, txt = _leaves((257, 128), (257, 128))
    scale = torch.tensor(14.0, device=DEV, requires_grad=True)
    return [img, txt], _with_grads(lambda: sf.clip_loss(img, txt, scale), [img, txt, scale])


@_case("siglip")
def _siglip():
    img, txt = _leaves((257, 128), (257, 128))
    scale = torch.tensor(10.0, device=DEV, requires_grad=True)
    bias = torch.tensor(-10.0, device=DEV, requires_grad=True)
    return [img, txt], _with_grads(lambda: sf.siglip_loss(img, txt, scale, bias), [img, txt, scale, bias])


@_case("barlow_twins")
def _barlow_twins():
    b1, b2 = _leaves((256, 1000), (256, 1000))
    return [b1, b2], _with_grads(lambda: sf.barlow_twins_loss(b1, b2), [b1, b2])


@_case("vicreg")
def _vicreg():
    b1, b2 = _leaves((256, 1000), (256, 1000))
    return [b1, b2], _with_grads(lambda: sf.vicreg_loss(b1, b2), [b1, b2])


@_case("dino")
def _dino():
    s = torch.randn(10 * 8, 4096, device=DEV, requires_grad=True)
    t, c = torch.randn(2 * 8, 4096, device=DEV), torch.randn(1, 4096, device=DEV) * 0.1
    return [s, t], _with_grads(lambda: sf.dino_loss(s, t, c), [s])


def _mae_inputs():
    """Images [16, 3, 224, 224] bf16 and a mask of 196 patches (75 % masked)."""
    return (
        torch.randn(16, 3, 224, 224, device=DEV, dtype=torch.bfloat16),
        mae.random_masking(16, 196, 0.75, device=DEV),
    )


@_case("mae norm-pix loss")
def _mae_loss():
    imgs, m = _mae_inputs()
    pred = torch.randn(16, 196, 768, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    return [pred, imgs], _with_grads(lambda: mae.masked_mse_loss(pred, imgs, m.mask, 16), [pred])


@_case("mae unshuffle")
def _mae_unshuffle():
    _, m = _mae_inputs()
    x = torch.randn(16, 49, 256, device=DEV, requires_grad=True)
    token = torch.zeros(1, 1, 256, device=DEV, requires_grad=True)
    return [x], _with_grads(lambda: mae.unshuffle(x, m.ids_restore, token).float().square().mean(), [x, token])


@_case("mae gather_patches")
def _mae_gather_patches():
    imgs, m = _mae_inputs()
    return [imgs], lambda: [mae.gather_patches(imgs, m.ids_keep, 16).clone()]


@pytest.mark.parametrize("name", CASES)
def test_op_replays_from_a_cuda_graph(name):
    inputs, call = CASES[name]()
    captured = {}

    def body():
        captured["out"] = call()  # the capture's outputs live in the graph's pool: every replay rewrites them

    graph = bench.capture(body, torch.device(DEV))
    assert graph is not None, f"{name} could not be captured"
    with torch.no_grad():
        for t in inputs:
            t.copy_(torch.randn_like(t))
    graph.replay()
    replayed = [o.clone() for o in captured["out"]]
    eager = call()
    for r, e in zip(replayed, eager, strict=True):
        torch.testing.assert_close(r.float(), e.float(), rtol=2e-2, atol=1e-4)


def test_random_masking_replays_draw_new_masks():
    """The masking kernel reads its seed from device memory: each replay draws a new permutation, as eager
    calls do, instead of replaying the captured one."""
    holder = {}

    def call():
        holder["m"] = mae.random_masking(8, 196, 0.75, device=DEV)

    graph = bench.capture(call, torch.device(DEV))
    assert graph is not None
    graph.replay()
    first = holder["m"].ids_keep.clone()
    graph.replay()
    assert not torch.equal(first, holder["m"].ids_keep)
    assert (holder["m"].mask.sum(1) == 196 - 49).all()
