"""Model definitions: DiT and its plain config; VAE and PixArt live beside it."""
from graft_jax.models.config import DiTConfig, LayerSpec, OpSpec, dit_config
from graft_jax.models.dit import DiT, init_params

__all__ = ["init_params", "DiT", "DiTConfig", "LayerSpec", "OpSpec", "dit_config"]
