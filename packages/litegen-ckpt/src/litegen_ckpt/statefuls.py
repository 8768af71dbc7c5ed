"""What a checkpoint stores for each kind of live object, as DCP state dicts keyed by clean FQNs.

``adapters`` picks one adapter per keyword of a save or load. Each has three methods:
    state_dict()              what to save (DTensor shards where the object is sharded)
    template(saved, prefix)   the tensors DCP loads into, shaped for the live object
    load(state)               puts the loaded ``template`` back into the live object

An optimizer is stored in torch's flattened form, ``state.<fqn>.<name>`` and
``param_groups.<fqn>.<hyper-parameter>``, whatever the degree, so a ZeRO-1 checkpoint loads into a plain
or FSDP optimizer and the other way round.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _get_fqns,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

from .storage import raise_if

try:
    import numpy
except ImportError:  # numpy is optional: its RNG is saved only when it is installed
    numpy = None

FLAT_OPTIMIZER = StateDictOptions(flatten_optimizer_state_dict=True)


def adapters(statefuls: dict[str, Any], rank: int) -> dict[str, Adapter]:
    """Classify the keyword statefuls of a save or load; raise on anything that cannot be checkpointed."""
    raise_if(
        not statefuls, ValueError, "no statefuls given; pass e.g. model=model, optimizer=optimizer, rng=True"
    )
    models = [name for name, obj in statefuls.items() if isinstance(obj, nn.Module)]
    found: dict[str, Adapter] = {}
    for name, obj in statefuls.items():
        if isinstance(obj, torch.optim.Optimizer):
            if len(models) != 1:
                raise TypeError(
                    f"{name}= is an optimizer: pass exactly one nn.Module in the same call (the model it "
                    f"optimizes), got {len(models)}: {models}"
                )
            model = statefuls[models[0]]
            if isinstance(obj, ZeroRedundancyOptimizer):
                found[name] = ZeroOptimizerState(model, obj)
            else:  # torch's FQN-keyed (flattened) optimizer state dict, plain or FSDP2
                found[name] = InPlaceState(
                    partial(get_optimizer_state_dict, model, obj, options=FLAT_OPTIMIZER),
                    partial(set_optimizer_state_dict, model, obj, options=FLAT_OPTIMIZER),
                )
        elif isinstance(obj, nn.Module):  # any degree: plain, DDP, FSDP2, HSDP, checkpoint-wrapped
            found[name] = InPlaceState(partial(get_model_state_dict, obj), partial(set_model_state_dict, obj))
        elif name == "rng" and isinstance(obj, bool):
            if obj:
                found[name] = RNGState(rank)
        elif callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
            found[name] = InPlaceState(obj.state_dict, obj.load_state_dict)  # EMA, sampler, LR scheduler, ...
        else:
            raise TypeError(
                f"{name}={type(obj).__name__}: expected an nn.Module, a torch Optimizer, rng=True/False, "
                "or an object with state_dict() and load_state_dict()"
            )
    return found


class InPlaceState:
    """An object saved as its ``state_dict()``, which is also the template DCP loads into, and restored by ``load``."""

    def __init__(
        self, state_dict: Callable[[], dict[str, Any]], load: Callable[[dict[str, Any]], None]
    ) -> None:
        self.state_dict, self.load = state_dict, load

    def template(self, saved: Metadata, prefix: str) -> dict[str, Any]:
        return self.state_dict()


class ZeroOptimizerState:
    """A ZeroRedundancyOptimizer (ZeRO-1): each rank saves and loads the state of the parameters it owns.

    Keys are the flattened torch form, so they are disjoint across ranks and any world size can load them.
    Per-parameter states are flat (``exp_avg``, ``momentum_buffer``, ...), as for torch's own optimizers.
    """

    def __init__(self, model: nn.Module, optimizer: ZeroRedundancyOptimizer) -> None:
        self.optimizer = optimizer
        # each parameter's clean FQN (no DDP / compile / checkpoint-wrapper prefixes), as DCP names it
        self.fqns = {param: next(iter(_get_fqns(model, name))) for name, param in model.named_parameters()}
        self.owned = {id(p) for group in optimizer.optim.param_groups for p in group["params"]}  # this rank's

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for group in self.optimizer.param_groups:
            for param in (p for p in group["params"] if id(p) in self.owned):
                fqn = self.fqns[param]
                state |= {f"state.{fqn}.{k}": v for k, v in self.optimizer.optim.state.get(param, {}).items()}
                state |= {f"param_groups.{fqn}.{k}": v for k, v in group.items() if k != "params"}
        return state

    def template(self, saved: Metadata, prefix: str) -> dict[str, Any]:
        fqns, groups = self.fqns, self.optimizer.param_groups
        wanted = {f"{prefix}.state.{fqns[p]}" for g in groups for p in g["params"] if id(p) in self.owned}
        wanted |= {f"{prefix}.param_groups.{fqns[g['params'][0]]}" for g in groups if g["params"]}
        return {
            key[len(prefix) + 1 :]: _empty_like_saved(meta)
            for key, meta in saved.state_dict_metadata.items()
            if key.rpartition(".")[0] in wanted
        }

    def load(self, state: dict[str, Any]) -> None:
        """Rebuild torch's index-keyed state dict for the owned parameters and let ZeRO load it."""
        per_fqn: dict[str, dict[str, Any]] = {}
        for key, value in state.items():
            if key.startswith("state."):
                fqn, _, name = key[len("state.") :].rpartition(".")
                per_fqn.setdefault(fqn, {})[name] = value
        native_state, groups, index = {}, [], 0
        for group in self.optimizer.param_groups:
            first = self.fqns[group["params"][0]] if group["params"] else ""
            hypers = {k: state.get(f"param_groups.{first}.{k}", v) for k, v in group.items() if k != "params"}
            groups.append({**hypers, "params": list(range(index, index + len(group["params"])))})
            for param in group["params"]:
                if id(param) in self.owned and self.fqns[param] in per_fqn:
                    native_state[index] = per_fqn[self.fqns[param]]
                index += 1
        self.optimizer.load_state_dict({"state": native_state, "param_groups": groups})


class RNGState:
    """This rank's torch CPU, CUDA, python ``random`` and numpy generator states, under ``rank_<r>``."""

    def __init__(self, rank: int) -> None:
        self.key = f"rank_{rank}"

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if numpy is not None:  # stored as python values, so loading needs no numpy unpickling
            kind, key, pos, has_gauss, gauss = numpy.random.get_state()
            state["numpy"] = (kind, key.tolist(), pos, has_gauss, gauss)
        return {self.key: state}

    def template(self, saved: Metadata, prefix: str) -> dict[str, Any]:
        held = {
            key.split(".")[2] for key in saved.state_dict_metadata if key.startswith(f"{prefix}.{self.key}.")
        }
        # the generators it saved: a run without CUDA or numpy saved none for them
        return {self.key: {name: v for name, v in self.state_dict()[self.key].items() if name in held}}

    def load(self, state: dict[str, Any]) -> None:
        state = state[self.key]
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "numpy" in state and numpy is not None:
            kind, key, pos, has_gauss, gauss = state["numpy"]
            numpy.random.set_state((kind, numpy.asarray(key, dtype=numpy.uint32), pos, has_gauss, gauss))


Adapter = InPlaceState | ZeroOptimizerState | RNGState  # what ``adapters`` returns, one per stateful


def _empty_like_saved(meta: Any) -> Any:
    """A tensor to load a saved tensor into, or a placeholder DCP replaces with a saved python value."""
    if isinstance(meta, TensorStorageMetadata):
        return torch.empty(meta.size, dtype=meta.properties.dtype)
    return None
