"""Build script: the pure-Python package plus an optional torch-free CUDA extension.

`kernels/` is installed as `sslfast.kernels`. Every `csrc/*.cu` file is compiled by nvcc into one
pybind11 module, `sslfast._C`, when nvcc is found; without nvcc (or with SSLFAST_NO_CUDA_BUILD=1) the
step is skipped and the package falls back to its Triton / PyTorch paths.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
# sm_80 (A100), sm_90 (H100/H200) machine code, plus PTX for newer parts.
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def _nvcc():
    if os.environ.get("SSLFAST_NO_CUDA_BUILD") == "1":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    which = shutil.which("nvcc")
    if which:
        candidates.append(Path(which))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((str(c) for c in candidates if c.is_file()), None)


class NvccBuildExt(build_ext):
    """Compiles the `.cu` sources with nvcc directly: no torch headers, no torch.utils.cpp_extension."""

    def build_extensions(self):
        super().build_extensions()
        # A skipped or failed extension has no file: drop it, or the (editable) install's copy step fails.
        self.extensions = [e for e in self.extensions if Path(self.get_ext_fullpath(e.name)).is_file()]

    def build_extension(self, ext):
        nvcc = _nvcc()
        if nvcc is None or not ext.sources:
            print(f"sslfast: skipping {ext.name} (nvcc not found or no csrc sources)", file=sys.stderr)
            return
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            nvcc,
            "-O3",
            "-std=c++17",
            "-shared",
            "-Xcompiler",
            "-fPIC",
            "--expt-relaxed-constexpr",
            *CUDA_ARCH_FLAGS,
            f"-I{pybind11.get_include()}",
            f"-I{self._python_include()}",
            f"-I{ROOT / 'csrc'}",
            *ext.sources,
            "-o",
            str(out),
            "-lcudart",
        ]
        print(" ".join(cmd), file=sys.stderr)
        try:
            subprocess.check_call(cmd, cwd=ROOT)
        except (OSError, subprocess.CalledProcessError) as err:
            if os.environ.get("SSLFAST_REQUIRE_CUDA_BUILD") == "1":
                raise
            print(f"sslfast: building {ext.name} failed ({err}); continuing without it", file=sys.stderr)

    @staticmethod
    def _python_include():
        import sysconfig

        return sysconfig.get_paths()["include"]


setup(
    packages=[
        "sslfast",
        "sslfast.kernels",
        "sslfast.ops",
        "sslfast.reference",
        "sslfast.nn",
        "sslfast.data",
        "sslfast.methods",
        "sslfast.models",
        "sslfast.bench",
    ],
    package_dir={"sslfast.kernels": "kernels"},
    ext_modules=[Extension("sslfast._C", sources=CUDA_SOURCES)] if CUDA_SOURCES else [],
    cmdclass={"build_ext": NvccBuildExt},
)
