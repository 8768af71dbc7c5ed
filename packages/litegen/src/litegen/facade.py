"""``LiteGen(config).initialize(*objs)``: classify each object, optimize it, return them in order.

The trainable model goes through, in this order: tensor parallelism → sequence-parallel plan →
activation checkpointing → activation offload → compile → sharding (ZeRO degree) → pretrained weights
→ EMA. Each step lives in the package that owns it; this module only decides what applies and in
which order.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import itertools
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import litegen_ckpt
import litegen_ema
import litegen_sp
import litegen_vae
import litegen_zero
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from .activations import apply_activation_checkpointing, apply_activation_offload, check_blocks
from .config import DTYPES, LiteGenConfig, config_as_dict, raise_if, split_config
from .data import ResumableLoader, ResumableSampler
from .meta_init import check_meta_model, materialize_meta
from .runtime import Runtime, name_collective_timeout, seed_everything, start

logger = logging.getLogger("litegen")

STEP_DIR = re.compile(r"step_[0-9]+")


def _frames_or_batch(frames: Callable[..., Any], batch: Callable[..., Any]) -> Callable[..., Any]:
    """``frames(x)`` for a 5-D clip ``(b, c, t, h, w)``, ``batch(x)`` for anything else."""

    def encode(x: Any, *args: Any, **kwargs: Any) -> Any:
        return (frames if isinstance(x, torch.Tensor) and x.dim() == 5 else batch)(x, *args, **kwargs)

    return encode


class Layout:
    """The world's layout as a stateful: saved with every checkpoint, ``saved`` holds what a resume read."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = {
            "dp_size": runtime.dp_size,
            "sp_size": runtime.sp_size,
            "world_size": runtime.world_size,
        }
        self.saved: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return dict(self.current)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.saved = {key: int(value) for key, value in state.items()}


class LiteGen:
    """The facade: ``gen = LiteGen(config)``; ``model, optimizer, ... = gen.initialize(model, optimizer, ...)``.

    ``config``: a YAML path, a dict or a ``LiteGenConfig``. Building it validates the config, joins
    (or creates) the process group, builds the dp × sp meshes and seeds every rank identically, so a
    model built afterwards starts with the same weights everywhere. ``start_step`` is the number of
    completed steps: 0, or the step of the checkpoint a resume loaded (save ``step + 1`` after step ``step``).
    """

    def __init__(self, config: str | os.PathLike | dict | LiteGenConfig | None = None) -> None:
        split = split_config(config)  # LiteGen's keys; a whole training config's others are the trainer's
        self.config: LiteGenConfig = split.config
        logging.getLogger("litegen").setLevel(self.config.log_level.upper())
        self.runtime: Runtime = start(self.config)
        if self.is_main:
            logger.info("LiteGen config: %s", config_as_dict(self.config))
            split.log(logger)
            logger.info(
                "world %d = dp %d x sp %d x tp %d on %s",
                self.runtime.world_size,
                self.runtime.dp_size,
                self.runtime.sp_size,
                self.runtime.tp_size,
                self.device,
            )
        seed_everything(self.config.global_seed)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.dataloader: ResumableLoader | None = None
        self.ema: Any = None
        self.start_step: int = 0  # completed steps: 0, or the step of the checkpoint resumed
        self._layout = Layout(self.runtime)
        self._checkpointer: Any = None
        self._model_config: bytes | None = None  # the model's config.json, attached to every checkpoint
        # autocast, loss scaling and the step that skips non-finite gradients
        self._precision: litegen_zero.MixedPrecision | None = None
        self._partly_loaded: str | None = None  # why the live objects may hold part of a checkpoint

    # ---- where this process stands -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.runtime.sp_group

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.runtime.dp_group

    # ---- initialize ----------------------------------------------------------------------------
    def initialize(
        self,
        *objs: Any,
        sp_plan: Any = None,
        blocks: Sequence[nn.Module] | None = None,
        tp_plan: Any = None,
    ) -> Any:
        """Optimize each object by kind and return them in the given order (one object: unwrapped).

        Trainable ``nn.Module`` (exactly one) → TP, SP, checkpointing, offload, compile, sharding, EMA;
        ``Optimizer`` → rebuilt on the sharded parameters; frozen ``nn.Module`` → sharded encoder or
        moved to the device, in eval mode; map-style ``Dataset`` → resumable ``DataLoader``; a loss (torch's
        loss modules and functions, or a callable named ``*loss``) → unchanged; any other callable
        (``vae.encode``) → time-parallel (causal video VAE) or data-parallel / sliced / compiled encode.
        ``sp_plan``: a ``litegen_sp.SPPlan`` for models the default plan does not fit; ``blocks``:
        the repeated blocks (default: ``litegen_zero.find_blocks``), one list for TP, SP, checkpointing and
        sharding; ``tp_plan``: torch's TP plan (``litegen_zero.tensor_parallel``) when ``tp_size`` > 1 and
        neither the model's ``_tp_plan`` nor its structure fits.
        """
        model, optimizer, prepare = self._dispatch(objs)  # raises on every rank before any collective
        out = list(objs)
        with self._naming_timeouts("initialize()"):
            if model is not None:
                opt = objs[optimizer] if optimizer is not None else None
                out[model], opt = self._prepare_model(objs[model], opt, sp_plan, blocks, tp_plan)
                if optimizer is not None:
                    out[optimizer] = opt
            for i, step in prepare.items():
                out[i] = step(objs[i])
            seed_everything(self.config.global_seed + 1 + self.runtime.dp_rank)  # distinct noise per dp rank
            if self.config.resume_from is not None or self.config.auto_resume:
                self._resume_at_start()
        return out[0] if len(out) == 1 else tuple(out)

    def _dispatch(
        self, objs: Sequence[Any]
    ) -> tuple[int | None, int | None, dict[int, Callable[[Any], Any]]]:
        """One pass over ``initialize``'s arguments by type: the trainable model's index, the optimizer's, and
        the step that prepares each other object (a loss has none). Refuses, naming the argument, what cannot
        be initialized."""
        models, optimizers, prepare = [], [], {}
        for i, obj in enumerate(objs):
            if isinstance(obj, nn.Module) and any(p.requires_grad for p in obj.parameters()):
                models.append(i)
            elif _is_loss(obj):
                self._log(f"initialize: argument {i} ({_name(obj)}) is a loss: returned unchanged")
            elif isinstance(obj, nn.Module):
                prepare[i] = self._prepare_frozen
            elif isinstance(obj, torch.optim.Optimizer):
                optimizers.append(i)
            elif isinstance(obj, IterableDataset):
                raise TypeError(
                    f"initialize: argument {i} is an IterableDataset ({type(obj).__name__}); "
                    "pass a map-style Dataset (with __len__ and __getitem__)"
                )
            elif isinstance(obj, Dataset) or (
                hasattr(obj, "__getitem__")
                and hasattr(obj, "__len__")
                and not callable(obj)
                and not isinstance(obj, (str, bytes, dict))
            ):
                self._check_dataset_size(i, obj)
                prepare[i] = self._prepare_dataset
            elif callable(obj) and not isinstance(obj, type):
                prepare[i] = functools.partial(self._prepare_encode, index=i)
            else:
                raise TypeError(
                    f"initialize: argument {i} has type {type(obj).__name__}; expected a trainable "
                    "nn.Module, an Optimizer, a frozen nn.Module, a map-style Dataset or a callable"
                )
        names = ", ".join(f"argument {i} ({type(objs[i]).__name__})" for i in models)
        raise_if(
            len(models) > 1,
            ValueError,
            f"initialize: exactly one trainable nn.Module is allowed, got {names}; freeze the "
            "others (requires_grad_(False)) to have them treated as encoders",
        )
        raise_if(
            len(optimizers) > 1,
            ValueError,
            f"initialize: at most one optimizer is allowed, got arguments {optimizers}",
        )
        raise_if(
            bool(optimizers) and not models,
            ValueError,
            f"initialize: the optimizer (argument {(optimizers or [None])[0]}) needs its trainable model in the "
            "same call",
        )
        raise_if(
            bool(models) and self.model is not None,
            ValueError,
            "initialize: a trainable model was already initialized by this LiteGen",
        )
        return (models or [None])[0], (optimizers or [None])[0], prepare

    def _check_dataset_size(self, index: int, dataset: Any) -> None:
        """An epoch must give every data-parallel rank at least one batch, or ``batches()`` never yields."""
        c, dp = self.config, self.runtime.dp_size
        raise_if(
            c.global_batch_size is None,
            ValueError,
            f"config: global_batch_size is null, but argument {index} is a Dataset; set global_batch_size "
            "(samples per step over the whole world)",
        )
        size, batch = len(dataset), c.global_batch_size // dp
        per_rank = size // dp if c.drop_last else -(-size // dp)
        raise_if(
            per_rank < batch,
            ValueError,
            f"initialize: argument {index} ({type(dataset).__name__}) has {size} samples, so an epoch "
            f"gives each of the dp_size={dp} data-parallel ranks {per_rank}, less than its batch of "
            f"{batch} (global_batch_size={c.global_batch_size} / dp_size={dp}); allowed: a dataset "
            f"of at least {batch * dp} samples, or a smaller global_batch_size",
        )

    def _prepare_model(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        sp_plan: Any,
        blocks: Sequence[nn.Module] | None,
        tp_plan: Any,
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """The trainable model's steps, in order; each logs its line."""
        c, rt = self.config, self.runtime
        self._model_config = _model_config(model)
        meta = check_meta_model(model, from_file=c.init_from is not None)  # raises before any collective
        block_list = list(blocks) if blocks is not None else litegen_zero.find_blocks(model)
        check_blocks(model, block_list)
        self._log(f"initialize: trainable {type(model).__name__}, {len(block_list)} blocks")
        if c.zero_degree < 2:  # DDP holds the whole model on every rank; FSDP2 moves each unit's shard itself
            if meta:
                materialize_meta(model, self.device, seed=c.global_seed, reset=c.init_from is None)
            self._to_device(model)
        if c.tp_size > 1:
            litegen_zero.tensor_parallel(
                model, rt.tp_mesh, plan=tp_plan, blocks=block_list, optimizer=optimizer
            )
            self._log(f"initialize: tensor parallel over {c.tp_size} ranks")
        if c.sp_size > 1:
            litegen_sp.sequence_parallel(
                model, rt.sp_group, plan=sp_plan, blocks=block_list, splits=rt.sp_splits
            )
            split = "per attention call" if c.sp_ring is None else f"{c.sp_size // c.sp_ring} x {c.sp_ring}"
            self._log(f"initialize: sequence parallel over {c.sp_size} ranks (Ulysses x Ring {split})")
        if c.selective_ratio < 1.0:
            block_list = apply_activation_checkpointing(model, block_list, c.selective_ratio)
            self._log(f"initialize: activation checkpointing ({1 - c.selective_ratio:.0%} of the blocks)")
        if c.ac_offload:
            apply_activation_offload(model, block_list, self.device)
            self._log("initialize: activation offload")
        if c.compile:
            for block in block_list:
                block.compile()
            self._log("initialize: torch.compile per block")
        model, optimizer = self._shard(model, optimizer, block_list, meta)
        if c.init_from is not None:
            litegen_ckpt.load_safetensors(model, c.init_from)
            self._log(f"initialize: weights from {c.init_from}")
        if c.ema.enable:
            e = c.ema
            warmup = (e.warmup_gamma, e.warmup_power) if e.warmup else None
            self.ema = litegen_ema.ShardedEMA(
                model, e.decay, warmup=warmup, update_after_step=e.update_after_step, sharded=e.sharded
            )
            self._log("initialize: EMA (sharded)" if e.sharded else "initialize: EMA (replicated)")
        self.model, self.optimizer = model, optimizer
        return model, optimizer

    def _shard(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, blocks: list[nn.Module], meta: bool
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """The config's ``lr`` / ``weight_decay``, the ZeRO degree, a meta model's shards, mixed precision."""
        c, rt = self.config, self.runtime
        if optimizer is not None:
            self._override_hyperparameters(optimizer)
        sharded = c.zero_degree >= 2
        model, optimizer = litegen_zero.shard(
            model,
            optimizer,
            degree=c.zero_degree,
            mesh=rt.zero_mesh,
            param_dtype=DTYPES[c.precision] if c.precision != "fp32" and sharded else None,
            reduce_dtype=DTYPES[c.grad_precision] if c.grad_precision not in (None, c.precision) else None,
            offload=c.cpu_offload,
            blocks=blocks,
        )
        self._log(
            f"initialize: ZeRO degree {c.zero_degree}"
            + (f", grouped by {rt.group_size}" if rt.group_size else "")
        )
        if meta and sharded:  # FSDP2 sharded the meta parameters: allocate local shards only
            device = torch.device("cpu") if c.cpu_offload else self.device
            materialize_meta(model, device, seed=c.global_seed, reset=c.init_from is None)
            self._log("initialize: meta model materialised shard by shard")
        self._precision = litegen_zero.MixedPrecision(
            optimizer, DTYPES[c.precision], device=self.device, autocast=not sharded, sharded=sharded
        )
        if c.precision != "fp32":
            cast = "FSDP2 parameters, fp32 master weights" if sharded else "autocast, fp32 weights"
            scaling = ", dynamic loss scaling" if c.precision == "fp16" else ""
            self._log(f"initialize: {c.precision} ({cast}{scaling})")
        return model, optimizer

    def _override_hyperparameters(self, optimizer: torch.optim.Optimizer) -> None:
        """Config ``lr`` sets every group's lr; ``weight_decay`` sets every group that had decay (>0)."""
        c = self.config
        for group in optimizer.param_groups:
            if c.lr is not None:
                group["lr"] = c.lr
            if c.weight_decay is not None and group.get("weight_decay", 0.0) > 0:
                group["weight_decay"] = c.weight_decay
        if c.lr is not None or c.weight_decay is not None:
            self._log(f"initialize: optimizer lr={c.lr}, weight_decay={c.weight_decay} from the config")

    def _to_device(self, module: nn.Module) -> None:
        """Move ``module`` to the device unless it is there (also a no-op for fake tensors, when planning)."""
        if any(t.device != self.device for t in [*module.parameters(), *module.buffers()]):
            module.to(self.device)

    def _prepare_frozen(self, module: nn.Module) -> nn.Module:
        """Frozen, on the device; split over the TP group (``encoder.tp``), then sharded (``encoder.fsdp``)."""
        c, rt = self.config, self.runtime
        module.requires_grad_(False)
        self._to_device(module)
        split = c.tp_size > 1 and c.encoder.tp
        if split:  # raises on every rank before any collective
            try:
                litegen_zero.tensor_parallel(module, rt.tp_mesh, strict=False)
            except ValueError as error:
                raise ValueError(
                    f"{error}; or encoder.tp: false to keep {type(module).__name__} whole"
                ) from error
        if c.encoder.fsdp:
            dtype = DTYPES[c.precision] if c.precision != "fp32" else None
            # a split module shards over the dp dim of the TP mesh (FSDP2 x TP, as the trainable model)
            module = litegen_zero.shard_frozen(
                module, mesh=rt.zero_mesh if split else rt.frozen_mesh, dtype=dtype
            )
        module.eval()
        where = "sharded" if c.encoder.fsdp else f"on {self.device}"
        self._log(
            f"initialize: frozen {type(module).__name__} -> "
            + (f"tensor parallel over {c.tp_size} ranks, " if split else "")
            + f"{where}, eval mode"
        )
        return module

    def _prepare_dataset(self, dataset: Dataset) -> ResumableLoader:
        c, rt = self.config, self.runtime
        sampler = ResumableSampler(
            len(dataset),
            dp_rank=rt.dp_rank,
            dp_size=rt.dp_size,
            seed=c.global_seed,
            shuffle=c.shuffle,
            drop_last=c.drop_last,
        )
        loader = ResumableLoader(
            dataset,
            sampler,
            batch_size=c.global_batch_size // rt.dp_size,
            num_workers=c.num_workers,
            pin_memory=c.pin_memory and self.device.type == "cuda",
            drop_last=True,
            collate_fn=getattr(dataset, "collate_fn", None),
        )
        self.dataloader = loader
        self._log(
            f"initialize: dataset {type(dataset).__name__} -> DataLoader, {loader.batch_size} samples per rank "
            f"per step, {len(loader)} steps per epoch"
        )
        return loader

    def _prepare_encode(self, fn: Callable[..., Any], index: int) -> Callable[..., Any]:
        """``vae.encode`` of a causal video VAE → time-parallel over the SP group (then sliced); any other
        callable → compiled → sliced → batch split over the SP group (frames too only with ``per_frame``)."""
        v, sp, done = self.config.vae, self.runtime.sp_size, []
        parallel = v.data_parallel and sp > 1
        time_split = self._time_parallel(fn) if parallel else None
        if time_split is not None:
            fn = time_split
            done.append(f"{type(time_split.vae).__name__}.encode time-parallel over the {sp} SP ranks")
            if v.compile:
                done.append("not compiled (its hooks exchange frames between layers)")
        elif v.compile:
            fn = litegen_vae.compiled(fn)
            done.append("compiled")
        if v.slice_size is not None:
            fn = litegen_vae.sliced(fn, v.slice_size)
            done.append(f"sliced by {v.slice_size}")
        if parallel and time_split is None and v.per_frame:
            fn = _frames_or_batch(
                litegen_vae.data_parallel(fn, self.sp_group, dim=2),
                litegen_vae.data_parallel(fn, self.sp_group),
            )
            done.append(f"frames of 5-D clips (vae.per_frame), else the batch, split over the {sp} SP ranks")
        elif parallel and time_split is None:
            fn = litegen_vae.data_parallel(fn, self.sp_group)
            done.append(f"batch split over the {sp} SP ranks (frames never: set vae.per_frame if per-frame)")
        self._log(
            f"initialize: argument {index} ({_name(fn)}) is the encode callable -> {', '.join(done) or 'unchanged'}"
        )
        return fn

    def _time_parallel(self, fn: Callable[..., Any]) -> litegen_vae.TimeParallelEncode | None:
        """The time-parallel encode when ``fn`` is the bound ``encode`` of a VAE it splits exactly."""
        vae = getattr(fn, "__self__", None)
        if not isinstance(vae, nn.Module) or getattr(fn, "__name__", None) != "encode":
            return None
        try:
            return litegen_vae.time_parallel(vae, self.sp_group)
        except TypeError:  # not a causal video VAE
            return None
        except ValueError as error:
            self._log(
                f"initialize: {error}; whole clips are split over the SP ranks instead", logging.WARNING
            )
            return None

    def _log(self, message: str, level: int = logging.INFO) -> None:
        if self.is_main:
            logger.log(level, message)

    # ---- training-state API --------------------------------------------------------------------
    def _statefuls(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rng": True, "layout": self._layout}  # rng: every rank's generators
        if self._precision is not None and self._precision.scaler is not None:
            out["loss_scaler"] = self._precision
        for name in ("model", "optimizer", "ema", "dataloader"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @property
    def checkpointer(self) -> Any:
        if self.config.checkpoint_dir is None:
            raise ValueError("config: checkpoint_dir is not set; saving and resuming need it")
        if self._checkpointer is None:
            self._checkpointer = litegen_ckpt.Checkpointer(
                self.config.checkpoint_dir,
                keep=self.config.checkpoint_keep,
                async_save=self.config.checkpoint_async,
                timeout=self._timeout,
                files={"config.json": self._model_config} if self._model_config else None,
            )
        return self._checkpointer

    def save(self, step: int) -> None:
        """Save model, optimizer, EMA, data position, RNG and layout as ``checkpoint_dir/step_<step>``.

        ``step``: the number of completed steps; a resume sets ``start_step`` to it.
        """
        if self._partly_loaded is not None:
            raise ValueError(
                f"save({step!r}): the live objects may hold part of a checkpoint that failed to load "
                f"({self._partly_loaded}); resume a checkpoint that verifies first"
            )
        with self._naming_timeouts(f"save({step!r})"):
            self.checkpointer.save(step, **self._statefuls())

    def resume(self, step: int | str = "latest") -> int | None:
        """Load a checkpoint into the live objects; returns its step (now ``start_step``), or None when there is none.

        Every file is verified first; a checkpoint that does not verify raises an error naming the file.
        Under the layout that saved it, every rank's RNG streams continue exactly; under another
        (dp_size, sp_size, world_size) they are re-derived from ``(global_seed, step, dp_rank)``.
        """
        return self._resume(step, fall_back=False)

    def _resume(self, step: int | str, fall_back: bool) -> int | None:
        """Checkpoints are read into the live objects, item by item; a checksum that fails mid-read leaves them
        partly loaded (staging a second copy of model and optimizer would double their memory): then this
        says so, and ``save()`` refuses until a checkpoint that verifies is loaded."""
        try:
            with self._naming_timeouts(f"resume({step!r})"):
                loaded = self.checkpointer.load(step, fall_back=fall_back, **self._statefuls())
        except litegen_ckpt.CheckpointError as error:
            self._partly_loaded = str(error)
            raise litegen_ckpt.CheckpointError(
                f"{error}. The model, optimizer, EMA and data position may now hold part of this checkpoint: "
                "resume one that verifies (resume(step) or auto_resume, which falls back) before training"
            ) from error
        self._partly_loaded = None
        if loaded is not None:
            self.start_step = loaded
            self._log(f"resumed from step {loaded}")
            if self._layout.saved != self._layout.current:
                self._reseed_after_layout_change(loaded)
        return loaded

    def _reseed_after_layout_change(self, step: int) -> None:
        """Saved RNG states belong to other ranks' roles: derive fresh streams, identical within an SP group."""
        rt, saved = self.runtime, self._layout.saved
        key = f"{self.config.global_seed}/{step}/{rt.dp_rank}".encode()
        seed_everything(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % 2**63)
        self._log(
            f"resume: checkpoint saved at dp {saved['dp_size']} x sp {saved['sp_size']} (world "
            f"{saved['world_size']}), resumed at dp {rt.dp_size} x sp {rt.sp_size} (world {rt.world_size}): "
            f"RNG streams re-derived from (global_seed, step {step}, dp_rank)"
        )

    def _resume_at_start(self) -> None:
        """``resume_from`` loads exactly that checkpoint; ``auto_resume`` the newest one that verifies."""
        target = self.config.resume_from
        if target is None:
            self._resume("latest", fall_back=True)
            return
        path = Path(target)
        if STEP_DIR.fullmatch(path.name):
            if path.parent.resolve() != Path(self.config.checkpoint_dir).resolve():
                raise ValueError(
                    f"config: resume_from={target!r} is not in checkpoint_dir="
                    f"{self.config.checkpoint_dir!r}; give a step of checkpoint_dir"
                )
            target = path.name[len("step_") :]
        step = int(target) if re.fullmatch(r"[0-9]+", target) else target
        if self._resume(step, fall_back=False) is None:
            raise ValueError(
                f"config: resume_from={self.config.resume_from!r} found no checkpoint under "
                f"{self.config.checkpoint_dir!r}"
            )

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the trainable model's gradients (unscaled first under fp16); returns the global norm (any degree).
        A non-finite norm makes the next ``step()`` skip."""
        with self._naming_timeouts("clip_grad_norm_()"):
            return self._mixed("clip_grad_norm_()").clip_grad_norm_(self._trained(), max_norm, norm_type)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's context: ``torch.autocast`` to ``precision`` at degrees 0/1 (fp32 weights); nothing at
        degrees 2/3, where FSDP2 casts the parameters, or in fp32."""
        return self._mixed("autocast()").autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; under fp16 the loss is scaled first (dynamic loss scaling)."""
        self._mixed("backward()").backward(loss)

    def step(self) -> bool:
        """One optimizer step, then zeroed gradients; False when skipped: an fp16 overflow (the loss scale halves)
        or a non-finite ``clip_grad_norm_`` (any precision). Update the EMA only after a step that returns True."""
        with self._naming_timeouts("step()"):
            return self._mixed("step()").step()

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 without scaling)."""
        return self._precision.loss_scale if self._precision is not None else 1.0

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps ``step()`` skipped for non-finite gradients (saved in fp16 checkpoints)."""
        return self._precision.skipped_steps if self._precision is not None else 0

    def _mixed(self, during: str) -> litegen_zero.MixedPrecision:
        if self._precision is None:
            raise ValueError(
                f"{during}: no trainable model; pass it (and its optimizer) to initialize() first"
            )
        return self._precision

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Gradient accumulation: backward inside this context does not synchronize gradients."""
        return litegen_zero.no_sync(self._trained())

    def sp_split(self, x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, Any]:
        """This rank's slice of ``x`` along ``dim`` (padded to a multiple of sp_size) and the info to undo it."""
        return litegen_sp.split_sequence(x, self.sp_group, dim=dim)

    def sp_gather(self, x_local: torch.Tensor, info: Any, dim: int = 1) -> torch.Tensor:
        """The full sequence back from every SP rank's slice (padding trimmed)."""
        return litegen_sp.gather_sequence(x_local, self.sp_group, info, dim=dim)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable model's consolidated weights on rank 0 (clean names); {} elsewhere."""
        with self._naming_timeouts("full_state_dict()"):
            return litegen_zero.full_state_dict(self._trained())

    def _trained(self) -> nn.Module:
        if self.model is None:
            raise ValueError("no trainable model: pass it to initialize() first")
        return self.model

    def close(self) -> None:
        """Finish pending saves and free the checkpointer; destroy the process group if LiteGen created it."""
        if self._checkpointer is not None:
            with self._naming_timeouts("close()"):
                self._checkpointer.close()
            self._checkpointer = None
        # Mesh groups are left alone: torch caches them per mesh layout and hands them to later meshes.
        if self.runtime.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> LiteGen:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        """``close()``. On an error nothing is closed (no collective: a peer may be gone; a pending background
        save is abandoned, ``latest`` stays complete), and a backend timeout in the training loop (forward,
        backward, optimizer step) comes out as a ``CollectiveTimeoutError`` naming the collective."""
        if error is None:
            self.close()
            return
        named = name_collective_timeout(error, self.config.collective_timeout, "LiteGen training loop")
        if named is not None:
            raise named from error

    @property
    def _timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.config.collective_timeout)

    @contextlib.contextmanager
    def _naming_timeouts(self, during: str) -> Iterator[None]:
        """Re-raise a backend timeout inside as a ``CollectiveTimeoutError`` naming the collective that hung."""
        try:
            yield
        except RuntimeError as error:
            named = name_collective_timeout(error, self.config.collective_timeout, f"LiteGen.{during}")
            if named is None:
                raise
            raise named from error

    def batches(self) -> Iterator[Any]:
        """Batches epoch after epoch from the initialized dataset, resuming where it stopped; one batch per step
        until ``max_steps`` steps are done (counting the ``start_step`` a resume restored), forever without it."""
        raise_if(self.dataloader is None, ValueError, "no dataset: pass a Dataset to initialize() first")
        left = None if self.config.max_steps is None else max(self.config.max_steps - self.start_step, 0)
        epochs = (batch for _ in itertools.count() for batch in self.dataloader)
        yield from itertools.islice(epochs, left)


def _is_loss(obj: Any) -> bool:
    """torch's loss modules and functions (``nn.MSELoss()``, ``F.mse_loss``) and callables named ``*loss``."""
    name = getattr(obj, "__name__", "")
    return isinstance(obj, nn.modules.loss._Loss) or (
        callable(obj) and not isinstance(obj, nn.Module) and isinstance(name, str) and name.endswith("loss")
    )


def _name(obj: Any) -> str:
    """A callable's qualified name (``AutoencoderKL.encode``), else its type's name."""
    return str(getattr(obj, "__qualname__", None) or type(obj).__name__)


def _model_config(model: nn.Module) -> bytes | None:
    """The ``config.json`` ``from_pretrained`` reads: a diffusers model's own, or a transformers model's config."""
    for owner in (model, getattr(model, "config", None)):
        to_json = getattr(owner, "to_json_string", None)
        if callable(to_json):
            text = to_json()
            if isinstance(text, str):
                return text.encode()
    return None
