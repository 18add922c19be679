"""Benchmarks and the load harness. Every run targets 127.0.0.1 only and is bounded in count and time."""
