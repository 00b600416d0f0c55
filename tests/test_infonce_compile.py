"""torch.compile of the contrastive losses: a model using them compiles (aot_eager, with and without graph
breaks allowed) on the CPU, with torch's custom-op aliasing check turned into an error, and matches eager
forward and backward."""

import pytest
import torch

import sslfast as sf
from helpers import assert_close, assert_loss_close, leaf


@pytest.fixture(autouse=True)
def _aliasing_is_an_error():
    """AOTAutograd checks the custom ops' outputs on a compiled function's first call; by default a violation
    (an output aliasing an input or another output) is only a warning outside CI."""
    import torch._functorch.config as aot_config

    torch._dynamo.reset()
    with aot_config.patch(check_custom_op_aliasing=True, error_on_custom_op_aliasing=True):
        yield
    torch._dynamo.reset()


class _Head(torch.nn.Module):
    """A linear projection of two inputs, then one of the losses (the queue and scale are the module's)."""

    def __init__(self, loss: str, d: int):
        super().__init__()
        self.loss = loss
        self.proj = torch.nn.Linear(d, d)
        self.log_scale = torch.nn.Parameter(torch.tensor(1.3))
        self.register_buffer("queue", torch.nn.functional.normalize(torch.randn(11, d), dim=1))

    def forward(self, x, y):
        a, b = self.proj(torch.cat([x, y])).chunk(2)  # views of one tensor, as SimCLR's projector gives them
        if self.loss == "nt_xent":
            return sf.nt_xent_loss(a, b, 0.3)
        if self.loss == "info_nce":
            return sf.info_nce_loss(a, b, self.queue, 0.2)
        return sf.clip_loss(a, b, self.log_scale.exp())


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "clip"])
def test_compiled_module_matches_eager(seed, loss):
    """Forward and backward of the compiled module (graph breaks allowed) equal eager's to fp32 rounding."""
    n, d = 7, 12
    eager = _Head(loss, d)
    compiled_model = _Head(loss, d)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=False)
    x, y = torch.randn(n, d), torch.randn(n, d)
    got = compiled(x, y)
    got.backward()
    want = eager(x, y)
    want.backward()
    assert_loss_close(got, want, 1e-6, f"{loss}: compiled loss (seed {seed})")
    for (name, p), p0 in zip(compiled_model.named_parameters(), eager.parameters()):
        if p0.grad is None:
            assert p.grad is None, f"{loss}: {name} got a gradient eager does not give"
            continue
        assert_close(p.grad, p0.grad, 1e-5, f"{loss}: {name} grad (seed {seed})")


def test_torch_compile_fullgraph(seed, monkeypatch):
    """All three losses in one graph (fullgraph=True): the custom ops trace, and the compiled step's loss and
    gradients (inputs and the CLIP scale) equal eager's."""
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")

    def step(z1, z2, queue, scale):
        return (
            sf.nt_xent_loss(z1, z2, 0.3)
            + sf.info_nce_loss(z1, z2, queue, 0.2)
            + sf.info_nce_loss(z1, z2, None, 0.2)
            + sf.clip_loss(z1, z2, scale)
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z1, z2, queue, s = torch.randn(6, 8), torch.randn(6, 8), torch.randn(11, 8), torch.tensor(2.0)
    a, b, sc = leaf(z1), leaf(z2), leaf(s)
    got = compiled(a, b, queue, sc)
    got.backward()
    a0, b0, sc0 = leaf(z1), leaf(z2), leaf(s)
    want = step(a0, b0, queue, sc0)
    want.backward()
    assert_loss_close(got, want, 1e-6, "compiled loss")
    for g, w in ((a.grad, a0.grad), (b.grad, b0.grad), (sc.grad, sc0.grad)):
        assert_close(g, w, 1e-6, "compiled grad")
