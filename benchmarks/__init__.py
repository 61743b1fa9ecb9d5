"""Benchmark harness: ICE against PML's built-in losses (``python -m benchmarks.run``)."""
