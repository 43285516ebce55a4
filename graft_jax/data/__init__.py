"""Data: the demo set, ImageNet latents, teacher-generated sets."""
