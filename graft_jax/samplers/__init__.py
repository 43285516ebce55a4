"""Samplers beyond the DDPM/DDIM loops of diffusion.py."""
