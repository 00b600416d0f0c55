"""Every op family's two implementations honour its contract (`sslfast.ops._family`): the kernels module and the
PyTorch module define each contract function with the contract's parameter names, in its order; the four
layers share the family's name; and no ops module keeps a dispatch function of its own."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re

import pytest

import sslfast.ops  # noqa: F401  (declares every family)
from sslfast.ops._family import FAMILIES, Family

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _params(sig: inspect.Signature) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in sig.parameters.values()]


@pytest.fixture(params=sorted(FAMILIES), ids=str)
def family(request) -> Family:
    return FAMILIES[request.param]


def test_kernel_modules_all_declared():
    """Each kernels/<name>.py that defines an op (every module but the shared helpers) has a family."""
    kernel_modules = {p.stem for p in (ROOT / "kernels").glob("*.py") if not p.stem.startswith("_")}
    assert kernel_modules <= set(FAMILIES), f"kernels without a declared family: {kernel_modules - set(FAMILIES)}"


@pytest.mark.parametrize("layer", ["kernels", "torch"])
def test_implementation_matches_contract(family, layer):
    members = family.members()
    assert members, f"{family.name}: the contract {family.contract.__name__} declares no function"
    module = getattr(family, layer)
    for name, sig in members.items():
        impl = getattr(module, name, None)
        assert callable(impl), f"{module.__name__} lacks {name}, which {family.contract.__name__} declares"
        assert _params(inspect.signature(impl)) == _params(sig), (
            f"{module.__name__}.{name}{inspect.signature(impl)} differs from the contract's {name}{sig}"
        )


def test_one_name_across_layers(family):
    """ops/<name>.py declares the family, and the oracle module has the same name."""
    ops_module = importlib.import_module(f"sslfast.ops.{family.name}")
    assert getattr(ops_module, "FAMILY", None) is family
    assert (ROOT / "sslfast" / "reference" / f"{family.name}.py").exists()


def test_no_private_dispatchers():
    """Dispatch goes through `Family.impl`; no ops module defines its own `_impl` function."""
    offenders = [
        p.name for p in (ROOT / "sslfast" / "ops").glob("*.py") if re.search(r"^def _impl\b", p.read_text(), flags=re.M)
    ]
    assert not offenders, f"ops modules with their own dispatch function: {offenders}"


def test_reference_is_never_imported_at_run_time():
    """`sslfast.reference` is the float64 oracle: the runtime (ops, their PyTorch path, nn, methods, train,
    data, models) does not import it; benchmarks and tests may."""
    packages = ("ops", "nn", "methods", "train", "data", "models")
    runtime = [p for sub in packages for p in (ROOT / "sslfast" / sub).rglob("*.py")]
    runtime += [ROOT / "sslfast" / f for f in ("optim.py", "distributed.py", "mae.py", "cli.py")]
    offenders = [
        str(p.relative_to(ROOT))
        for p in runtime
        if re.search(r"^\s*from (\.+|sslfast\.)reference\b|^\s*from \.+ import reference\b", p.read_text(), flags=re.M)
    ]
    assert not offenders, f"runtime modules importing the oracle: {offenders}"


def test_dispatch_picks_by_device_and_accepts(monkeypatch):
    """`impl` returns the PyTorch module for CPU tensors under the default backend."""
    import torch

    monkeypatch.setenv("SSLFAST_BACKEND", "auto")
    for family in FAMILIES.values():
        assert family.impl(torch.zeros(2)) is family.torch
