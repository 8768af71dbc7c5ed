"""litegen_sp: Ulysses sequence parallelism for attention, usable on unmodified DiT models.

Layout: ``(batch, seq, heads, head_dim)``. See ``ulysses`` for the collectives and the gradient rule,
``plan`` for running an unmodified model's blocks under SP.
"""

from .plan import SPPlan, sequence_parallel
from .ulysses import SequenceInfo, attention, gather_sequence, split_sequence, ulysses_attention

__all__ = [
    "SPPlan",
    "SequenceInfo",
    "attention",
    "gather_sequence",
    "sequence_parallel",
    "split_sequence",
    "ulysses_attention",
]
