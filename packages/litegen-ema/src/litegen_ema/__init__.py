"""litegen_ema: sharded EMA of a model's weights, 1/N of the model per rank, no communication per step."""

from litegen_ema.ema import ShardedEMA

__all__ = ["ShardedEMA"]
