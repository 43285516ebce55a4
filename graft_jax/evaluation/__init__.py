"""Evaluation: feature networks, metrics, benchmarks."""
