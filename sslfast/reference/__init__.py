"""Plain-PyTorch implementations: the papers' math (float64 test oracle, benchmark baseline) and the
memory-safe CPU paths the ops dispatch to."""
