"""Throughput benchmarks: cmil_jax against a PyTorch twin of the same model (see RESULTS.md)."""
