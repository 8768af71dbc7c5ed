"""Mixed precision beside sharding: autocast where the weights stay fp32, dynamic loss scaling for fp16, and an
optimizer step that skips non-finite gradients at every precision and degree.

Degrees 0/1 (DDP, ZeRO-1) keep fp32 weights and compute under ``torch.autocast``; degrees 2/3 cast through FSDP2's
``MixedPrecisionPolicy`` (``shard(param_dtype=...)``) with fp32 master weights, so autocast is off there. fp16
scales the loss with torch's ``GradScaler``; under FSDP2 each rank holds a shard of the gradients, so the
``ShardedGradScaler`` all-reduces the overflow flag and every rank skips the same steps.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from litegen_zero._shard import raise_if
from litegen_zero._train import clip_grad_norm_

logger = logging.getLogger(__name__)
PRECISIONS = (torch.float32, torch.bfloat16, torch.float16)


class MixedPrecision:
    """Autocast, loss scaling and the skipping step for one model's optimizer (None: autocast only).

    ``dtype``: the compute dtype (fp32: no autocast, no scaling). ``autocast``: run the forward under
    ``torch.autocast`` (weights kept in fp32: degrees 0/1); False where FSDP2 casts the weights (degrees 2/3).
    ``sharded``: the gradients are sharded (FSDP2), so overflow flags are all-reduced over ``process_group``
    (default: the world). ``init_scale``, ``growth_interval``: the loss scaler's, as in ``GradScaler``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        dtype: torch.dtype,
        *,
        device: torch.device,
        autocast: bool,
        sharded: bool,
        process_group: dist.ProcessGroup | None = None,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
    ) -> None:
        raise_if(
            optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer),
            TypeError,
            f"optimizer={type(optimizer).__name__}; expected a torch.optim.Optimizer or None",
        )
        if dtype not in PRECISIONS:
            raise ValueError(f"dtype={dtype!r}; allowed: one of {list(PRECISIONS)}")
        self.optimizer, self.dtype, self.device = optimizer, dtype, torch.device(device)
        self._autocast = autocast and dtype != torch.float32
        self.scaler: torch.amp.GradScaler | None = None
        if dtype == torch.float16:
            options = {"init_scale": init_scale, "growth_interval": growth_interval}
            self.scaler = (
                ShardedGradScaler(
                    self.device.type, process_group=process_group or dist.group.WORLD, **options
                )
                if sharded and dist.is_initialized()
                else torch.amp.GradScaler(self.device.type, **options)
            )
        self.skipped_steps = 0
        self._finite = True  # the last clip_grad_norm_'s norm, until the step

    @property
    def loss_scale(self) -> float:
        """The current loss scale (1.0 without scaling)."""
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's context: ``torch.autocast`` to ``dtype`` where the weights are fp32, else nothing."""
        if not self._autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, the loss scaled first under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Unscale (fp16), clip to a global norm of ``max_norm`` and return that norm, shape (); a non-finite norm
        makes the next ``step`` skip."""
        if self.scaler is not None:
            self.scaler.unscale_(self._optimizer("clip_grad_norm_"))
        norm = clip_grad_norm_(model, max_norm, norm_type)
        self._finite = self._finite and bool(torch.isfinite(norm))
        return norm

    def step(self) -> bool:
        """One optimizer step, then the gradients are zeroed; returns False when it was skipped.

        Skipped: an fp16 overflow (the scale halves) or a non-finite norm from ``clip_grad_norm_`` (any precision).
        Every rank decides alike: the norm is global, and the overflow flag is too (replicated or all-reduced).
        """
        optimizer = self._optimizer("step")
        finite, self._finite = self._finite, True
        if self.scaler is None:
            if finite:
                optimizer.step()
        elif finite:
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            finite = (
                self.scaler.get_scale() >= scale
            )  # an overflow backs the scale off; nothing else lowers it
        else:  # finite scaled gradients whose norm is not: the scaler saw no overflow, back it off by hand
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        optimizer.zero_grad(set_to_none=True)
        if not finite:
            self.skipped_steps += 1
            logger.warning(
                "non-finite gradients: optimizer step skipped (%d so far); loss scale now %g",
                self.skipped_steps,
                self.loss_scale,
            )
        return finite

    def _optimizer(self, during: str) -> torch.optim.Optimizer:
        raise_if(
            self.optimizer is None, ValueError, f"{during}: no optimizer; pass the model's optimizer too"
        )
        return self.optimizer

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state and the skipped-step count, as plain python values (checkpointed with the model)."""
        return {
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scaler = state.get("scaler", {})
        if self.scaler is not None and scaler:
            self.scaler.load_state_dict(scaler)
        self.skipped_steps = int(state.get("skipped_steps", 0))
