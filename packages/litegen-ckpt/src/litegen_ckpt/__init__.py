"""litegen_ckpt: sharded, resumable, crash-safe checkpoints (torch.distributed.checkpoint) and safetensors I/O."""

from .checkpointer import Checkpointer, CheckpointError
from .safetensors_io import export_safetensors, load_safetensors

__all__ = ["CheckpointError", "Checkpointer", "export_safetensors", "load_safetensors"]
