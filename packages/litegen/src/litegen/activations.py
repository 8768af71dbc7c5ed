"""Activation memory: selective activation checkpointing and activation offload, per block.

Checkpointing wraps the chosen blocks with torch's non-reentrant ``checkpoint_wrapper`` (an evenly
spread ``1 - selective_ratio`` of them). Offload installs ``saved_tensors_hooks`` around each block
call: on CUDA, saved tensors are copied to pinned CPU memory on a side stream during forward and
copied back, one block ahead, during backward; on CPU there is no device memory to save, so it is
a no-op (with one warning).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

logger = logging.getLogger("litegen")

# Tensors smaller than this stay on the device: the copy would cost more than the memory it frees.
MIN_OFFLOAD_BYTES = 1 << 20


def checkpointed_indices(num_blocks: int, selective_ratio: float) -> list[int]:
    """Indices of the blocks to checkpoint: ``round((1 - ratio) * n)`` of them, evenly spread."""
    count = round((1.0 - selective_ratio) * num_blocks)
    if count <= 0:
        return []
    return sorted({math.floor(i * num_blocks / count) for i in range(count)})


def apply_activation_checkpointing(
    model: nn.Module, blocks: list[nn.Module], selective_ratio: float
) -> list[nn.Module]:
    """Wrap an evenly spread ``1 - selective_ratio`` of ``blocks`` (submodules of ``model``) in non-reentrant
    checkpointing; each wrapper is registered in the block's place in its parent. Returns the new block list."""
    chosen = [blocks[i] for i in checkpointed_indices(len(blocks), selective_ratio)]
    wrapped = {id(b): checkpoint_wrapper(b, checkpoint_impl=CheckpointImpl.NO_REENTRANT) for b in chosen}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in wrapped:
                parent.register_module(name, wrapped[id(child)])
    return [wrapped.get(id(b), b) for b in blocks]


def check_blocks(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Every block must be a submodule of ``model`` (the wrappers take their places there)."""
    inside = {id(m) for m in model.modules()}
    missing = [b for b in blocks if id(b) not in inside]
    if missing:
        raise ValueError(f"blocks: {len(missing)} of the given blocks are not submodules of the model")


class ActivationOffload:
    """Offload the tensors autograd saves inside each block to pinned CPU memory (CUDA only).

    Forward: every saved tensor of at least ``MIN_OFFLOAD_BYTES`` is copied device→host on a side
    stream; the device copy is released once the copy has finished. Backward runs blocks in reverse:
    the first unpack of block ``i`` waits for its tensors and starts fetching block ``i - 1``'s.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        if not self.enabled:
            logger.warning(
                "ac_offload: activation offload is a no-op on %s (no device memory to free)", device.type
            )
            return
        self.d2h = torch.cuda.Stream(device)
        self.h2d = torch.cuda.Stream(device)
        self.groups: list[list[Any]] = []  # per block call: [host tensor, ready event, device tensor | None]
        self.fetched: dict[int, list[torch.Tensor]] = {}

    def _pack(self, group: int, tensor: torch.Tensor) -> Any:
        if (
            tensor.device.type != "cuda"
            or tensor.numel() * tensor.element_size() < MIN_OFFLOAD_BYTES
            or isinstance(tensor, nn.Parameter)  # alive anyway: a host copy would free nothing
            or (tensor.is_leaf and tensor.requires_grad)
        ):
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.d2h)  # the allocator reuses the device memory only after the copy
        self.groups[group].append(host)
        return (group, len(self.groups[group]) - 1)

    def _fetch(self, group: int) -> None:
        if group < 0 or group in self.fetched:
            return
        self.h2d.wait_stream(self.d2h)
        with torch.cuda.stream(self.h2d):
            self.fetched[group] = [h.to(self.device, non_blocking=True) for h in self.groups[group]]

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        group, index = packed
        self.fetched.pop(group + 1, None)  # backward has left the later block: free its device copies
        self._fetch(group)
        self._fetch(group - 1)  # prefetch the block that backward reaches next
        torch.cuda.current_stream(self.device).wait_stream(self.h2d)
        out = self.fetched[group][index]
        out.record_stream(torch.cuda.current_stream(self.device))
        return out

    @contextlib.contextmanager
    def block(self) -> Iterator[None]:
        """Offload what autograd saves while this context is open (one block call)."""
        if not self.enabled or not torch.is_grad_enabled():
            yield
            return
        group = len(self.groups)
        self.groups.append([])
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(group, t), self._unpack):
            yield

    def reset(self) -> None:
        """Forget the step's tensors (call after backward; done by the forward pre-hook of the model)."""
        if self.enabled:
            self.groups.clear()
            self.fetched.clear()


def apply_activation_offload(
    model: nn.Module, blocks: list[nn.Module], device: torch.device
) -> ActivationOffload:
    """Run each block call inside ``ActivationOffload.block()``; the model's forward starts a new step."""
    offload = ActivationOffload(device)
    if not offload.enabled:
        return offload

    open_blocks: list[contextlib.AbstractContextManager] = []  # the block call in progress

    def enter(module: nn.Module, args: Any) -> None:
        open_blocks.append(offload.block())
        open_blocks[-1].__enter__()

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        open_blocks.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(lambda m, a: offload.reset())
    for block in blocks:
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave, always_call=True)
    return offload
