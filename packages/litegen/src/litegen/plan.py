"""Every rank's peak memory for a LiteGen config, measured before launch on fake tensors, and a search of the
configurations that fit a device.

``plan`` runs one training step of the real pipeline — ``LiteGen(config)`` and ``initialize`` (SP, activation
checkpointing, sharding, EMA, frozen encoders), the frozen encoders' forward, the model's forward under
``gen.autocast()``, backward and the optimizer step — in a ``FakeTensorMode`` over a fake process group of the
planned world size (torch's ``fake`` backend: collectives do nothing, no peer is needed). torch's memory trackers
(``FSDPMemTracker`` for degrees 2/3, ``MemTracker`` for 0/1) follow every allocation of this rank; nothing is
computed and no memory is allocated, so a model of any size is planned on a laptop. The meshes are built outside
the fake mode (by ``LiteGen(config)``), as torch requires.

What a trace cannot see is added by stated rules, each in ``Plan.parts``:
  - ``ema`` and ``frozen encoders`` (the VAE too): their (sharded) tensors exist before the traced step; their
    local bytes. The encoders' forward and the VAE's encode run before the model's and are traced on their own
    (``encode``): their transient memory is freed before the step's, so the peak takes the larger of the two.
  - DDP (degrees 0/1) is traced unwrapped (its C++ reducer cannot take fake tensors): with
    ``gradient_as_bucket_view`` its buckets are the gradients' storage, held for the whole run, so ``gradients``
    is the trainable parameters' bytes.
  - the host memory of CPU offload and activation offload is not device memory: on a CPU-only trace everything
    is "device"; ``cpu_offload`` moves parameters, gradients and optimizer state to the host, ``ac_offload`` the
    saved activations (reported apart, in ``host``).
The second of two traced steps is reported (the first creates the optimizer state); ``measure`` reports the third
of three real steps (a real DDP rebuilds its gradient buckets once, in the second).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from .config import LiteGenConfig, config_as_dict, load_config, raise_if

logger = logging.getLogger("litegen")

# tracker categories -> the plan's parts (FSDPMemTracker's names, then MemTracker's)
PARTS = {
    "Sharded Param": "parameters",
    "Parameter": "parameters",
    "Unsharded Param": "gathered parameters",
    "Buffer": "buffers",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "gradients",
    "Gradient": "gradients",
    "OptState": "optimizer state",
    "Optstate": "optimizer state",
    "Activation": "activations",
    "Temp": "temporaries",
    "All Gather": "communication",
    "Reduce Scatter": "communication",
    "Inputs": "inputs",
    "Other": "other",
}
HOST_PARTS = ("parameters", "gradients", "optimizer state")  # where cpu_offload keeps them
# held for the whole run; the rest is the step's (or the encoders' forward's) transient memory
PERSISTENT = ("parameters", "buffers", "gradients", "optimizer state", "ema", "frozen encoders")


@dataclass
class Workload:
    """What one rank trains: factories called inside the fake mode.

    ``model()``: the trainable model. ``inputs()``: this rank's forward keyword arguments (the per-rank batch).
    ``encoders``: frozen modules with their inputs, ``[(make_encoder, make_inputs), ...]``. ``vae``: a frozen VAE
    and the keyword inputs of its ``encode``, passed to ``initialize`` as ``vae.encode`` (sliced, split over the
    SP group, time-parallel, as configured). ``optimizer``: built
    on the trainable parameters (default AdamW). ``loss``: the scalar loss of the model's output.
    """

    model: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    encoders: Sequence[tuple[Callable[[], nn.Module], Callable[[], dict[str, Any]]]] = ()
    vae: tuple[Callable[[], nn.Module], Callable[[], dict[str, Any]]] | None = None
    optimizer: Callable[[Any], torch.optim.Optimizer] = torch.optim.AdamW
    loss: Callable[[Any], torch.Tensor] | None = None


@dataclass
class Plan:
    """One rank's predicted peak in bytes: ``parts`` of the training step (held ones and the step's transient ones);
    ``peak`` = the held parts + the larger of the step's transient parts and the encoders' forward (``encode``)."""

    config: dict[str, Any]
    world_size: int
    rank: int
    parts: dict[str, int]
    host: dict[str, int] = field(
        default_factory=dict
    )  # bytes kept on the host (cpu_offload), not in ``peak``
    peak: int = 0
    device_memory: int | None = None
    seconds: float = 0.0
    encode: int = 0  # transient bytes of the frozen encoders' forward and the VAE's encode (before the step)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fits": self.fits}

    def table(self) -> str:
        """The parts as a text table, largest first, with the peak and whether it fits."""
        rows = [
            f"{name:<22}{_gib(size):>12}" for name, size in sorted(self.parts.items(), key=lambda kv: -kv[1])
        ]
        host = [f"{name + ' (host)':<22}{_gib(size):>12}" for name, size in self.host.items() if size]
        fits = (
            ""
            if self.device_memory is None
            else f" of {_gib(self.device_memory)}: " + ("fits" if self.fits else "does NOT fit")
        )
        head = (
            f"rank {self.rank} of {self.world_size}: zero_degree {self.config['zero_degree']}, sp_size "
            f"{self.config['sp_size']}, tp_size {self.config['tp_size']}, selective_ratio "
            f"{self.config['selective_ratio']}, precision {self.config['precision']}"
        )
        encode = (
            [f"{'encode':<22}{_gib(self.encode):>12}  (encoders / VAE, before the step)"]
            if self.encode
            else []
        )
        return "\n".join([head, *rows, *host, *encode, f"{'peak':<22}{_gib(self.peak):>12}{fits}"])


def plan(
    config: str | os.PathLike | dict | LiteGenConfig,
    workload: Workload,
    *,
    world_size: int,
    rank: int = 0,
    gpus_per_node: int | None = None,
    device_memory: int | None = None,
) -> Plan:
    """Trace one training step of ``workload`` under ``config`` as ``rank`` of ``world_size``; see the module.

    Runs in this process over a fake process group: torch.distributed must not be initialized (the ``litegen
    plan`` command is a fresh process). ``gpus_per_node``: the node size (``LOCAL_WORLD_SIZE``) for grouped
    ZeRO-3 and grouped encoders; default the whole world. ``device_memory``: bytes per device, for ``fits``.
    """
    return next(plans([config], workload, world_size=world_size, rank=rank, gpus_per_node=gpus_per_node,
                      device_memory=device_memory))  # fmt: skip


def plans(
    configs: Sequence[str | os.PathLike | dict | LiteGenConfig],
    workload: Workload,
    *,
    world_size: int,
    rank: int = 0,
    gpus_per_node: int | None = None,
    device_memory: int | None = None,
) -> Iterator[Plan | Exception]:
    """``plan`` of each config in turn over one fake world (a config the world refuses yields its error)."""
    for name, value in (("world_size", world_size), ("rank", rank)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < 0
            or (name == "world_size" and value < 1)
        ):
            raise ValueError(f"{name}={value!r}; allowed: an int >= {1 if name == 'world_size' else 0}")
    raise_if(rank >= world_size, ValueError, f"rank={rank!r}; allowed: 0 <= rank < world_size={world_size}")
    raise_if(
        dist.is_initialized(),
        ValueError,
        "plan: torch.distributed is already initialized; plan in a fresh process (the litegen plan command "
        "does), which it joins to a fake world of world_size ranks",
    )
    from torch.testing._internal.distributed.fake_pg import FakeStore

    node = gpus_per_node or world_size
    with mock.patch.dict(os.environ, LOCAL_WORLD_SIZE=str(node), WORLD_SIZE=str(world_size), RANK=str(rank)):
        dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
        try:
            for config in configs:
                try:
                    yield _trace(load_config(config), workload, world_size, rank, device_memory)
                except (ValueError, TypeError, RuntimeError) as error:
                    if len(configs) == 1:
                        raise
                    yield error
        finally:
            dist.destroy_process_group()


def measure(config: str | os.PathLike | dict | LiteGenConfig, workload: Workload) -> Plan:
    """The same two steps and trackers as ``plan``, on real tensors in the current world (every rank calls it):
    what ``plan`` predicts, measured. For checking the planner (``tools/bench/planner.py``)."""
    return _trace(load_config(config), workload, dist.get_world_size(), dist.get_rank(), None, fake=False)


def _trace(
    config: LiteGenConfig,
    workload: Workload,
    world: int,
    rank: int,
    device_memory: int | None,
    fake: bool = True,
) -> Plan:
    from .facade import LiteGen  # the facade imports this module's package; no cycle at import time

    start = time.perf_counter()
    config = dataclasses.replace(config, log_level="ERROR", checkpoint_dir=None, auto_resume=False,
                                 resume_from=None, init_from=None)  # fmt: skip
    gen = LiteGen(config)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
            model = workload.model()
            optimizer = workload.optimizer([p for p in model.parameters() if p.requires_grad])
            encoders = [make() for make, _ in workload.encoders]
            with _RealStaysReal() if fake and config.tp_size > 1 else contextlib.nullcontext():
                model, optimizer, *encoders = gen.initialize(model, optimizer, *encoders)
            vae = workload.vae[0]().requires_grad_(False) if workload.vae is not None else None
            encode_fn = gen.initialize(vae.encode) if vae is not None else None  # built on the device
            tracker = (
                FSDPMemTracker(model, optimizer) if config.zero_degree >= 2 else _tracker(model, optimizer)
            )
            steps = 2 if fake else 3  # a real DDP rebuilds its buckets in the second step: measure the third
            encode = max((_encoder_peak(e, e, make_inputs, steps) for e, (_, make_inputs) in
                          zip(encoders, workload.encoders, strict=True)), default=0)  # fmt: skip
            if vae is not None:
                encode = max(encode, _encoder_peak(vae, encode_fn, workload.vae[1], steps))
            with tracker:
                for step in range(steps):
                    _step(gen, model, optimizer, workload)
                    if step < steps - 1:
                        tracker.reset_mod_stats()
            parts = _parts(tracker)
        if config.zero_degree < 2 and fake:  # DDP's buckets (the gradients' storage), held for the whole run:
            # a real DDP's are tracked (at its forward, as activations); the unwrapped fake trace lacks them
            parts["gradients"] = sum(_local_bytes(p) for p in model.parameters() if p.requires_grad)
        if gen.ema is not None:
            parts["ema"] = sum(_local_bytes(t) for t in gen.ema.state_dict().values())
        frozen = [*encoders, *([vae] if vae is not None else [])]
        if frozen:
            parts["frozen encoders"] = sum(
                _local_bytes(t) for e in frozen for t in [*e.parameters(), *e.buffers()]
            )
        host = {name: parts.pop(name) for name in HOST_PARTS if config.cpu_offload and name in parts}
        if config.ac_offload and "activations" in parts:  # the blocks' saved activations wait on the host
            host["activations"] = parts.pop("activations")
        persistent = sum(size for name, size in parts.items() if name in PERSISTENT)
        step = sum(size for name, size in parts.items() if name not in PERSISTENT)
        return Plan(config_as_dict(config), world, rank, parts, host, persistent + max(step, encode), device_memory,
                    time.perf_counter() - start, encode)  # fmt: skip
    finally:
        gen.close()


class _RealStaysReal(TorchFunctionMode):
    """Inside the fake trace, an op whose tensor arguments are all plain real tensors (made before the trace: a
    DeviceMesh's rank map, when FSDP joins the dp and tp meshes of a TP parameter) runs for real."""

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        real = tensors and all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors)
        with unset_fake_temporarily() if real else contextlib.nullcontext():
            return func(*args, **kwargs)


def _parts(tracker: MemTracker) -> dict[str, int]:
    """The tracker's peak snapshot as the plan's parts (bytes)."""
    parts: dict[str, int] = {}
    for device_snapshot in tracker.get_tracker_snapshot("peak").values():
        for key, size in device_snapshot.items():
            if key != "Total" and size:
                parts[PARTS.get(key, "other")] = parts.get(PARTS.get(key, "other"), 0) + int(size)
    return parts


def _encoder_peak(
    encoder: nn.Module, call: Callable[..., Any], make_inputs: Callable[[], dict[str, Any]], steps: int
) -> int:
    """The transient bytes of ``call`` (a frozen encoder's forward, a VAE's encode: gathered blocks, activations),
    the module's own tensors excluded."""
    tracker = FSDPMemTracker(encoder) if isinstance(encoder, FSDPModule) else _tracker(encoder)
    with tracker, torch.no_grad():
        for step in range(steps):
            call(**make_inputs())
            if step < steps - 1:
                tracker.reset_mod_stats()
    return sum(size for name, size in _parts(tracker).items() if name not in PERSISTENT)


def _step(gen: Any, model: nn.Module, optimizer: torch.optim.Optimizer, workload: Workload) -> None:
    """One step as a trainer runs it (no clip: a norm's value would be data-dependent)."""
    with gen.autocast():
        out = model(**workload.inputs())
    loss = workload.loss(out) if workload.loss is not None else _first_tensor(out).float().pow(2).mean()
    gen.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if gen.ema is not None:
        gen.ema.update(1)


class _NoHook:
    """Stands in for the gradient hooks torch's ``MemTracker`` registers on every parameter a module holds: it
    cannot register them on a frozen one (torch raises), and a frozen parameter gets no gradient to track."""

    def remove(self) -> None:
        pass


def _tracker(module: nn.Module, *external: torch.optim.Optimizer) -> MemTracker:
    """A ``MemTracker`` of ``module`` (and the optimizer), its frozen parameters without gradient hooks."""
    tracker = MemTracker()
    for param in module.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    tracker.track_external(module, *external)
    return tracker


def _first_tensor(out: Any) -> torch.Tensor:
    """The model's output tensor: itself, ``.sample`` (diffusers), or the first of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "sample", None), torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"the model returned {type(out).__name__}; give Workload(loss=...) to make a scalar of it"
    )


def _local_bytes(tensor: torch.Tensor) -> int:
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).nbytes


def candidates(base: dict[str, Any], world_size: int, gpus_per_node: int) -> list[dict[str, Any]]:
    """The configurations ``--fit`` tries: ZeRO degree, grouped or not, sp_size (divisors of the world up to the
    node), selective ratio (none, half, all checkpointed), activation offload, CPU offload; the EMA sharded."""
    out = []
    sps = [s for s in range(1, gpus_per_node + 1) if world_size % s == 0 and gpus_per_node % s == 0]
    for degree, sp, ratio, ac_offload in itertools.product(range(4), sps, (1.0, 0.5, 0.0), (False, True)):
        if ac_offload and ratio == 0.0:
            continue  # nothing is saved to offload
        groupings = [False, True] if degree == 3 and gpus_per_node < world_size else [False]
        offloads = [False, True] if degree == 3 else [False]
        for group, cpu_offload in itertools.product(groupings, offloads):
            ema = (
                {**base.get("ema", {}), "sharded": True}
                if base.get("ema", {}).get("enable")
                else base.get("ema", {})
            )
            out.append({**base, "zero_degree": degree, "group_zero": group, "sp_size": sp, "selective_ratio": ratio,
                        "ac_offload": ac_offload, "cpu_offload": cpu_offload, "ema": ema})  # fmt: skip
    return out


def step_cost(config: dict[str, Any], parameter_bytes: int, world_size: int) -> tuple[int, float, float]:
    """The proxy ``--fit`` orders by, lowest first: (host transfers, recomputed forward share, bytes communicated
    per step as multiples of the model's parameter bytes). Host transfers (CPU or activation offload) cost most,
    then recomputation (the checkpointed share of blocks re-runs its forward), then communication: DDP / ZeRO-1
    all-reduce the gradients (2x), ZeRO-2 reduce-scatters them and all-gathers the parameters once (2x), ZeRO-3
    gathers the parameters twice (forward and backward) and reduce-scatters (3x); SP adds its all-to-alls (1x)."""
    host = int(config["cpu_offload"]) + int(config["ac_offload"])
    recompute = 1.0 - config["selective_ratio"]
    comm = {0: 2.0, 1: 2.0, 2: 2.0, 3: 3.0}[config["zero_degree"]] + (1.0 if config["sp_size"] > 1 else 0.0)
    return host, recompute, comm * parameter_bytes * (world_size - 1) / world_size


def _gib(size: int) -> str:
    return f"{size / 2**30:.3f} GiB" if size >= 2**27 else f"{size / 2**20:.1f} MiB"
