"""The csrc-backed fast implementation of an op family whose kernels are CUDA C++ (csrc/, the extension
`sslfast._C`) rather than Triton: the family's ``kernels=`` module (`sslfast.ops._family.Family`). Each module
imports `sslfast._C` only when it launches, so it imports on machines without CUDA or the extension."""
