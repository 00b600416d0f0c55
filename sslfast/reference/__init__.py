"""The papers' math written literally, in plain PyTorch: the float64 test oracle and the benchmarks' baseline.
Nothing at run time imports it; the ops' PyTorch implementations are in `sslfast.ops._torch`."""
