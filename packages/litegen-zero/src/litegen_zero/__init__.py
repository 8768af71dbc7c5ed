"""litegen_zero: DDP, ZeRO-1/2/3 and grouped ZeRO-3 on torch.distributed, sharded frozen models, mixed
precision, tensor parallelism."""

from litegen_zero._precision import MixedPrecision
from litegen_zero._shard import find_blocks, shard, shard_frozen
from litegen_zero._tp import tensor_parallel
from litegen_zero._train import clip_grad_norm_, full_state_dict, no_sync

__all__ = [
    "MixedPrecision",
    "clip_grad_norm_",
    "find_blocks",
    "full_state_dict",
    "no_sync",
    "shard",
    "shard_frozen",
    "tensor_parallel",
]
