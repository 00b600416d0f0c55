"""Ahead-of-time compilation of Triton kernels for sm_90 on a machine without a GPU (Triton ships ptxas).

The interpreter accepts code that a real compile rejects (non-constexpr globals, layouts, dot shapes), so
each op's tests compile its kernels at the launchers' GPU tile shapes in a subprocess without
TRITON_INTERPRET:

    check_compiles('''
    import sslfast.kernels.mae as K
    build(K._some_kernel, dict(X="*bf16", ...), dict(BLOCK=128, ...), num_warps=8)
    ''')

`build(fn, types, consts, num_warps, num_stages, aligned)` types every parameter not named in `types` as i32
and every name in `consts` as a constexpr, and prints the register count and spilled bytes of the result
(cuobjdump) as a JSON line.
"""

import os
import subprocess
import sys
import textwrap

import pytest

_PRELUDE = r'''
import inspect, json, os, re, subprocess, tempfile, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def _resources(cubin):
    """(registers, stack + local-memory bytes) from cuobjdump's resource usage of the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = sum(int(x) for x in re.findall(r"(?:STORE|LOAD):(\d+)", usage))
    return regs, spills

def build(fn, types, consts, num_warps=4, num_stages=3, aligned=()):
    """`aligned`: integer arguments the JIT would see as multiples of 16 (it specializes them so at run
    time); pointers are always taken as 16-byte aligned, as tensors from PyTorch's allocator are."""
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in aligned or sig[n].startswith("*")}
    src = ASTSource(fn, sig, {(names.index(k),): v for k, v in consts.items()}, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                        "num_stages": num_stages})
    regs, spills = _resources(k.asm["cubin"])
    print(json.dumps({"kernel": fn.fn.__name__, "regs": regs, "spills": spills,
                      "consts": {a: str(b) for a, b in consts.items()}}))
    return k
'''


def check_compiles(script: str, timeout: float = 600) -> str:
    """Runs `script` after the `build` prelude in a fresh interpreter-free process; returns its stdout."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = _PRELUDE + textwrap.dedent(script) + '\nprint("compiled")\n'
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
    return proc.stdout
