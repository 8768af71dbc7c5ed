"""litegen_vae: sliced, data-parallel and compiled encoders for frozen VAEs (see ``encode``)."""

from litegen_vae.encode import compiled, data_parallel, sliced

__all__ = ["sliced", "data_parallel", "compiled"]
