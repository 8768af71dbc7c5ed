"""litegen_vae: sliced, data-parallel and compiled encoders for frozen VAEs (see ``encode``), and the exact
time-parallel encode of long clips for causal 3-D video VAEs (see ``time_parallel``)."""

from litegen_vae.encode import compiled, data_parallel, sliced
from litegen_vae.time_parallel import TimeParallelEncode, time_parallel

__all__ = ["sliced", "data_parallel", "compiled", "time_parallel", "TimeParallelEncode"]
