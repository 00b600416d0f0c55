"""One op family, one contract, two implementations.

An op family named ``<name>`` lives in four modules that share that one name:

* ``kernels/<name>.py``: the Triton (or csrc-backed) implementation, for CUDA tensors;
* ``sslfast/ops/_torch/<name>.py``: the plain-PyTorch implementation, for CPU tensors, float64 and
  ``SSLFAST_BACKEND=reference``; memory-safe (chunked), differentiable twice through autograd;
* ``sslfast/ops/<name>.py``: validation, dispatch and the `torch.library` custom ops users call;
* ``sslfast/reference/<name>.py``: the papers' math written literally, the float64 test oracle and the
  benchmarks' baseline. Nothing at run time calls it.

The two implementations are interchangeable behind the family's *contract*: a `typing.Protocol` whose
members are the functions both modules define, with the same parameter names in the same order. An ops module
declares it once::

    class KoleoImpl(Protocol):
        def koleo_forward(self, x, eps): ...
        def koleo_backward(self, grad, x, nn, dist, rnorm, eps): ...

    FAMILY = Family("koleo", KoleoImpl, accepts=lambda x: x.dtype != torch.float64)

and dispatches with ``FAMILY.impl(x).koleo_forward(x, eps)``. ``self`` in the Protocol stands for the module
(a module satisfies a Protocol the way an instance does). `FAMILIES` lists every declared family;
``tests/test_family_contract.py`` checks each one's two modules against its contract.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from types import ModuleType

import torch

from .._backend import use_triton

FAMILIES: dict[str, Family] = {}


class Family:
    """An op family's two implementations of `contract`, chosen per call by the tensors' device and the backend.

    Args:
        name: the family's name, the module name in ``kernels/``, ``sslfast/ops/``, ``sslfast/ops/_torch/``
            and ``sslfast/reference/``.
        contract: a `typing.Protocol` whose methods are the functions both implementations define.
        accepts: an optional predicate over the dispatch tensors; when it returns False the PyTorch
            implementation runs even where the kernels could (e.g. float64, which the kernels do not take).
        kernels: the fast module's import path when it is not ``sslfast.kernels.<name>`` (e.g. a module
            wrapping the csrc extension).
        fast: whether the tensors may take the fast module (`sslfast._backend.use_triton`, or `use_csrc` for
            a csrc-backed family).

    Raises:
        ValueError: `name` is already declared.
    """

    __slots__ = ("name", "contract", "impl", "_accepts", "_fast", "_kernels_path", "_kernels", "_torch")

    def __init__(
        self,
        name: str,
        contract: type,
        *,
        accepts: Callable[..., bool] | None = None,
        kernels: str | None = None,
        fast: Callable[..., bool] = use_triton,
    ):
        if name in FAMILIES:
            raise ValueError(f"op family {name!r} is already declared")
        self.name = name
        self.contract = contract
        self._accepts = accepts
        self._fast = fast
        self._kernels_path = kernels or f"sslfast.kernels.{name}"
        self._kernels: ModuleType | None = None
        self._torch: ModuleType | None = None
        self.impl = self._dispatcher()
        FAMILIES[name] = self

    @property
    def kernels(self) -> ModuleType:
        """The kernels module, imported on first use (it imports Triton)."""
        if self._kernels is None:
            self._kernels = importlib.import_module(self._kernels_path)
        return self._kernels

    @property
    def torch(self) -> ModuleType:
        """The plain-PyTorch module ``sslfast.ops._torch.<name>``, imported on first use."""
        if self._torch is None:
            self._torch = importlib.import_module(f"sslfast.ops._torch.{self.name}")
        return self._torch

    def _dispatcher(self) -> Callable[..., ModuleType]:
        """`impl(*tensors)`: the implementation for an op over `tensors`, the kernels when `fast` says so and
        `accepts` (if any) agrees, else the PyTorch one. A closure over the family's fields rather than a
        method, because it runs on every call of every op (a bound method and its attribute reads cost about
        a microsecond of host time more)."""
        family, fast, accepts = self, self._fast, self._accepts
        kernels = torch_impl = None  # the modules, held in the closure once imported

        def pick(use_kernels: bool) -> ModuleType:
            nonlocal kernels, torch_impl
            if use_kernels:
                kernels = family.kernels
                return kernels
            torch_impl = family.torch
            return torch_impl

        if accepts is None:

            def impl(*tensors: torch.Tensor | None) -> ModuleType:
                if fast(*tensors):
                    return kernels or pick(True)
                return torch_impl or pick(False)
        else:

            def impl(*tensors: torch.Tensor | None) -> ModuleType:
                if fast(*tensors) and accepts(*tensors):
                    return kernels or pick(True)
                return torch_impl or pick(False)

        return impl

    def members(self) -> dict[str, inspect.Signature]:
        """The contract's functions and their signatures without ``self``."""
        out = {}
        for attr, value in vars(self.contract).items():
            if attr.startswith("_") or not callable(value):
                continue
            sig = inspect.signature(value)
            out[attr] = sig.replace(parameters=list(sig.parameters.values())[1:])
        return out

    def __repr__(self) -> str:
        return f"Family({self.name!r}, {self.contract.__name__})"
