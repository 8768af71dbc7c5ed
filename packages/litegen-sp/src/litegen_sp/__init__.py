"""litegen_sp: Ulysses x Ring sequence parallelism for attention, usable on unmodified DiT models.

Layout: ``(batch, seq, heads, head_dim)``. See ``ulysses`` for the collectives and the gradient rule,
``ring`` for ring attention and the Ulysses x Ring split, ``plan`` for running an unmodified model's
blocks under SP.
"""

from .plan import SPPlan, sequence_parallel
from .ring import usp_split
from .ulysses import SequenceInfo, attention, gather_sequence, split_sequence, ulysses_attention

__all__ = [
    "SPPlan",
    "SequenceInfo",
    "attention",
    "gather_sequence",
    "sequence_parallel",
    "split_sequence",
    "ulysses_attention",
    "usp_split",
]
