"""Triton kernels, one module per op family. Launchers take tensors and return tensors; no autograd and no
argument policing here (that lives in `sslfast.ops`)."""
