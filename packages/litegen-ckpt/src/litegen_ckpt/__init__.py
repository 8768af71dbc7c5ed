"""litegen_ckpt: sharded, resumable, crash-safe checkpoints (torch.distributed.checkpoint) and safetensors I/O."""

from .checkpointer import Checkpointer, CheckpointError
from .offline import describe, export, verify
from .safetensors_io import export_safetensors, load_safetensors

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "describe",
    "export",
    "export_safetensors",
    "load_safetensors",
    "verify",
]
