"""The plain-PyTorch implementation of each op family (`sslfast.ops._family`): what CPU tensors, float64 and
``SSLFAST_BACKEND=reference`` run. Each module implements its family's contract with the same function names
and parameters as ``kernels/<family>.py``; the papers' literal math is in `sslfast.reference`."""
