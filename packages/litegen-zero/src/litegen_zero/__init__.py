"""litegen_zero: DDP, ZeRO-1/2/3 and grouped ZeRO-3 on torch.distributed, plus sharded frozen models."""

from litegen_zero._shard import find_blocks, shard, shard_frozen
from litegen_zero._train import clip_grad_norm_, full_state_dict, no_sync

__all__ = ["clip_grad_norm_", "find_blocks", "full_state_dict", "no_sync", "shard", "shard_frozen"]
