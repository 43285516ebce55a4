"""Offline import of PyTorch checkpoints (state dicts as numpy) into Flax parameter trees."""
