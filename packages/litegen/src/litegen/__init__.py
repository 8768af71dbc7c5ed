"""LiteGen: fast, memory-lean diffusion training in two calls.

from litegen import LiteGen
gen = LiteGen("config.yaml")
model, optimizer, text_encoder, dataloader, vae_encode = gen.initialize(
    model, optimizer, text_encoder, dataset, vae.encode)
"""

from .config import EMAConfig, EncoderConfig, LiteGenConfig, VAEConfig, load_config
from .data import ResumableLoader, ResumableSampler
from .facade import LiteGen
from .runtime import CollectiveTimeoutError

__all__ = [
    "CollectiveTimeoutError",
    "LiteGen",
    "LiteGenConfig",
    "EncoderConfig",
    "EMAConfig",
    "VAEConfig",
    "load_config",
    "ResumableLoader",
    "ResumableSampler",
]
