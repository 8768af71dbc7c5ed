"""Exact time-parallel encode of one long video over a group of ranks, for causal 3-D video VAEs.

Domain decomposition in time, layer by layer. Every rank passes the same clip ``x: (b, c, t, h, w)``
and runs the VAE's own ``encode`` on its span of frames, while hooks (installed for the call only)
make every layer compute what it computes in the whole clip:

- a causal temporal convolution (kernel ``kt``, stride ``s``) gets, instead of its causal padding,
  the ``kt - s`` frames before the span (``kt - 1`` for ``s = 1``): each rank all-gathers the last
  ``kt - 1`` frames of every rank's input to that layer (rank 0's include its own padding), so no
  rank recomputes a receptive field;
- a GroupNorm over ``(C, T, H, W)`` (5-D input, or the tokens of an attention over frames) uses
  the clip's statistics: per-rank float64 sums and sums of squares are all-reduced;
- an attention whose mask is causal over frames attends to the keys and values of the ranks before.

Spans start at latent boundaries: latent 0 is frame 0 (encoded on its own by causal VAEs), latent
``j >= 1`` is frames ``1 + (j - 1) r .. j r`` (``r``: the temporal compression, the product of the
temporal strides), so each rank's span of frames encodes to a whole span of latents. Wan's encode,
which runs frame 0 and then chunks of 4 frames carrying a feature cache, runs on each rank as two
chunks: a first frame (frame 0 on rank 0; elsewhere a throw-away that only shapes the cache), then
the whole span, whose cache the hooks fill with the previous rank's frames.

Exactness is checked once per dtype and device: the first call encodes a small probe clip both ways
and refuses (the same error on every rank) a VAE with a time-mixing operation the hooks do not cover.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from litegen_vae.encode import (
    _all_gather_cat,
    _all_gather_rows,
    _check_group,
    _concatenate,
    _flatten,
    data_parallel,
    raise_if,
)

logger = logging.getLogger(__name__)

# AutoencoderKLWan.encode runs frame 0, then chunks of this many frames; frames after the last full
# chunk are dropped, so a clip must have 1 + 4k frames.
WAN_CHUNK = 4
# Largest probe side; a power of two, so any power-of-two spatial compression divides it.
PROBE_SIDE = 64


@dataclass(frozen=True)
class _Conv:
    """A causal temporal convolution. ``context``: frames in front of the span in the hooked module's
    input (causal padding, or cached frames the caller prepends); ``None``: the frames before the span
    arrive as the module's ``cache_x`` argument (Wan)."""

    module: nn.Module
    kernel: int
    stride: int
    context: int | None


class TimeParallelEncode:
    """``encode(x, *args, **kwargs)``: ``vae.encode`` of ``x: (b, c, t, h, w)``, frames split over ``group``.

    Build it with :func:`time_parallel`. Every rank passes the same ``x`` and gets ``vae.encode(x)``'s
    output (same structure) with whole latents ``(b, z, 1 + (t - 1) / r, h', w')``, or with
    ``gather=False`` its own span of latent frames (``spans(t)[rank]``) on dim 2.
    """

    def __init__(self, vae: nn.Module, group: dist.ProcessGroup | None, gather: bool) -> None:
        self.vae, self.group, self.gather = vae, group, gather
        self.convs, self.chunked = _plan(vae)
        self.ratio = math.prod(conv.stride for conv in self.convs)
        self.frame_unit = math.lcm(self.ratio, WAN_CHUNK) if self.chunked else self.ratio
        self.attentions = [
            m for m in vae.encoder.modules() if "attention_mask" in inspect.signature(m.forward).parameters
        ]
        self._verified: set[tuple[torch.dtype, torch.device]] = set()

    def spans(self, num_frames: int) -> list[tuple[int, int]]:
        """Each rank's ``[start, stop)`` of latent frames for a clip of ``num_frames`` frames."""
        self._check_frames(num_frames)
        world = self._world()
        rest = (num_frames - 1) // self.ratio  # latents after latent 0
        counts = [rest // world + (r >= world - rest % world) for r in range(world)]  # extras last
        counts[0] += 1
        starts = [sum(counts[:r]) for r in range(world)]
        return [(start, start + count) for start, count in zip(starts, counts, strict=True)]

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(
                f"time_parallel: x must be a video tensor (batch, channels, frames, height, width), got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        self._check_frames(x.size(2))
        if self._world() == 1:
            return self.vae.encode(x, *args, **kwargs)
        pg = dist.group.WORLD if self.group is None else self.group
        rows = _all_gather_rows(torch.tensor(x.shape, device=x.device), pg).tolist()
        raise_if(
            any(row != rows[0] for row in rows),
            ValueError,
            lambda: (
                f"time_parallel: the ranks of the group passed clips of shapes {rows}; every rank must pass "
                "the same clip"
            ),
        )
        with torch.no_grad():
            key = (x.dtype, x.device)
            if key not in self._verified:
                self._verify(x, args, kwargs, pg)
                self._verified.add(key)
            return self._encode(x, args, kwargs, pg)

    # ---- the encode ----------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, args: tuple, kwargs: dict, pg: dist.ProcessGroup) -> Any:
        """Whole groups of ``world`` clips split by batch (when gathering), the rest split in time."""
        whole = x.size(0) // dist.get_world_size(pg) * dist.get_world_size(pg) if self.gather else 0
        outputs = []
        if whole:  # each rank encodes whole clips, no halo traffic
            outputs.append(data_parallel(self.vae.encode, pg)(x[:whole], *args, **kwargs))
        if whole < x.size(0):
            outputs.append(self._encode_in_time(x[whole:], args, kwargs, pg, self.gather))
        return _concatenate(outputs, 0, "time_parallel", tuple(x.shape))

    def _encode_in_time(
        self, x: torch.Tensor, args: tuple, kwargs: dict, pg: dist.ProcessGroup, gather: bool
    ) -> Any:
        """Every rank encodes its span of every clip of ``x``; ``vae.encode``'s output, gathered."""
        run = _Run(pg)
        spans = self.spans(x.size(2))
        start, stop = spans[run.rank]
        first = 0 if start == 0 else 1 + (start - 1) * self.ratio  # frames of the span
        last = 0 if stop == 0 else 1 + (stop - 1) * self.ratio
        with self._hooked(run, x, first, last) as clip:
            leaves, rebuild = _flatten(self.vae.encode(clip, *args, **kwargs))
        drop = 1 if self.chunked and run.rank > 0 else 0  # the throw-away first chunk
        lengths = [b - a for a, b in spans]
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and leaf.dim() == 5:
                local = leaf.narrow(2, drop, lengths[run.rank])
                leaves[i] = _all_gather_cat(local, lengths, 2, pg) if gather else local.contiguous()
        return rebuild(leaves)

    @contextmanager
    def _hooked(self, run: _Run, x: torch.Tensor, first: int, last: int) -> Iterator[torch.Tensor]:
        """Hooks on the encoder's layers for one call; yields the clip to pass to ``vae.encode``."""
        handles = [
            conv.module.register_forward_pre_hook(functools.partial(_conv_hook, run, conv), with_kwargs=True)
            for conv in self.convs
        ]
        for module in self.attentions:
            handles.append(module.register_forward_pre_hook(run.attention_pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(run.attention_post_hook))
        own = x[:, :, max(first, int(self.chunked)) : last]  # chunked: frame 0 is encoded on its own
        run.empty = own.size(2) == 0  # it still takes part in every exchange, offering nothing
        span = own if own.size(2) else torch.zeros_like(x[:, :, : self.ratio])
        if self.chunked:  # frame 0 (or a throw-away) alone, then the rest of the span as one chunk
            clip = x[:, :, max(first - 1, 0) : max(first, 1)].expand(-1, -1, 1 + WAN_CHUNK, -1, -1)
            handles.append(
                self.vae.encoder.register_forward_pre_hook(_chunk_hook(run, span), with_kwargs=True)
            )
        else:
            clip, run.enabled = span, True
        try:
            with run:
                yield clip
        finally:
            for handle in handles:
                handle.remove()
        if run.problem:
            raise RuntimeError(run.problem)  # only while verifying: a refused structure

    # ---- checks --------------------------------------------------------------------------------
    def _verify(self, x: torch.Tensor, args: tuple, kwargs: dict, pg: dist.ProcessGroup) -> None:
        """Encode a small probe clip both ways; refuse, on every rank alike, when they differ."""
        world = dist.get_world_size(pg)
        frames = 1 + self.frame_unit * math.ceil(world * self.ratio / self.frame_unit)
        shape = (1, x.size(1), frames, min(x.size(3), PROBE_SIDE), min(x.size(4), PROBE_SIDE))
        probe = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)
        reference, _ = _flatten(self.vae.encode(probe, *args, **kwargs))
        problem = ""
        try:
            leaves, _ = _flatten(self._encode_in_time(probe, args, kwargs, pg, gather=True))
        except RuntimeError as error:
            problem, leaves = str(error), reference
        error = max(
            (
                ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
                for got, want in zip(leaves, reference, strict=True)
                if isinstance(want, torch.Tensor) and want.numel()
            ),
            default=0.0,
        )
        tolerance = 1e-4 if x.dtype in (torch.float32, torch.float64) else 3e-2  # relative
        status = torch.tensor([float(bool(problem)), error], dtype=torch.float64, device=x.device)
        dist.all_reduce(status, op=dist.ReduceOp.MAX, group=pg)
        if status[0] > 0 or status[1] > tolerance:
            raise ValueError(
                f"time_parallel: {type(self.vae).__name__} does not encode exactly with its frames split over {world} ranks "
                f"(probe clip {tuple(shape)}: relative error {status[1].item():.2e} > {tolerance:g}"
                f"{'; ' + problem if problem else ''}); its encoder mixes frames in a way these hooks do "
                "not cover (supported: causal temporal convolutions, GroupNorm over the clip, attention "
                "with a frame-causal mask). Use data_parallel over whole clips instead."
            )
        logger.debug(
            "time_parallel: %s exact on a %s probe (relative error %.2e)",
            type(self.vae).__name__,
            shape,
            error,
        )

    def _check_frames(self, frames: int) -> None:
        if frames < 1 or (frames - 1) % self.frame_unit:
            chunks = (
                f"; its encode drops the frames after the last chunk of {WAN_CHUNK}" if self.chunked else ""
            )
            raise ValueError(
                f"time_parallel: a clip of {frames} frames; {type(self.vae).__name__} takes 1 + {self.frame_unit}k frames "
                f"(frame 0 on its own, then {self.ratio} frames per latent frame{chunks}), e.g. "
                f"{1 + self.frame_unit * max((frames - 1) // self.frame_unit, 0)} or "
                f"{1 + self.frame_unit * ((frames - 1) // self.frame_unit + 1)}"
            )

    def _world(self) -> int:
        if self.group is None and not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)


def time_parallel(
    vae: nn.Module, group: dist.ProcessGroup | None = None, *, gather: bool = True
) -> TimeParallelEncode:
    """Encode one clip with its frames split over ``group``, exactly as ``vae.encode`` encodes it whole.

    ``vae``: an unmodified causal 3-D video VAE (diffusers' AutoencoderKLWan, AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo, ...) with tiling and frame-wise encoding off. Returns
    ``encode(x: (b, c, t, h, w), *args, **kwargs)`` with ``vae.encode``'s output; ``gather=False``: each
    rank's own span of latent frames (``encode.spans(t)``). With ``b >= world`` and ``gather``, whole groups
    of ``world`` clips are split by batch instead. Per-rank memory: its span (``sliced(encode, 1)`` bounds
    a batch to one clip at a time). ``group=None``: the default world, or a plain ``vae.encode`` when
    torch.distributed is not initialized. No gradients (a frozen VAE). ``TypeError``: not a causal video
    VAE; ``ValueError``: a video VAE whose encode cannot be split exactly (the message says why).
    """
    _check_group(group, "time_parallel")
    encoder = getattr(vae, "encoder", None)
    raise_if(
        not isinstance(vae, nn.Module) or not isinstance(encoder, nn.Module) or not hasattr(vae, "encode"),
        TypeError,
        f"time_parallel: vae must be a VAE module with .encoder and .encode (e.g. diffusers' "
        f"AutoencoderKLWan), got {type(vae).__name__}",
    )
    name = type(vae).__name__
    for flag in ("use_tiling", "use_framewise_encoding"):
        if getattr(vae, flag, False):
            raise ValueError(
                f"time_parallel: {name}.{flag} is True: its encode then blends tiles instead of encoding "
                f"the whole clip; switch it off ({'vae.disable_tiling()' if flag == 'use_tiling' else f'vae.{flag} = False'}) "
                "- the time-parallel encode bounds memory exactly"
            )
    return TimeParallelEncode(vae, group, gather)


# ---- structure ----------------------------------------------------------------------------------
def _plan(vae: nn.Module) -> tuple[list[_Conv], bool]:
    """The encoder's causal temporal convolutions, and whether its encode runs cached chunks (Wan)."""
    name = type(vae).__name__
    chunked = "feat_cache" in inspect.signature(vae.encoder.forward).parameters
    if chunked and getattr(getattr(vae, "config", None), "patch_size", None) is not None:
        raise ValueError(
            f"time_parallel: {name} has patch_size={vae.config.patch_size}: its encode patchifies the "
            "clip before its chunks; only unpatchified Wan VAEs (patch_size None) are supported"
        )
    convs, inner = [], set()
    for path, module in vae.encoder.named_modules():
        conv = getattr(module, "conv", None)
        wrapped = isinstance(conv, nn.Conv3d) and (
            hasattr(module, "time_causal_padding") or hasattr(module, "is_causal")
        )
        if wrapped:
            inner.add(conv)
        elif isinstance(module, nn.Conv3d) and module not in inner:
            conv = module
        else:
            continue
        if conv.kernel_size[0] > 1 or conv.stride[0] > 1:  # pointwise in time: nothing to exchange
            where = f"{name}.encoder.{path}"
            convs.append(_wrapped_conv(module, conv, where) if wrapped else _plain_conv(conv, where))
    raise_if(
        not convs,
        TypeError,
        f"time_parallel: {name} is not a causal 3-D video VAE (no temporal convolution in its "
        "encoder); encode its frames with data_parallel(encode, group, dim=2) if it is per-frame",
    )
    return convs, chunked


def _wrapped_conv(module: nn.Module, conv: nn.Conv3d, path: str) -> _Conv:
    """A module that pads in time, then calls ``module.conv`` (HunyuanVideo, LTX-Video, Mochi, CogVideoX)."""
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    raise_if(
        "conv_cache" in inspect.signature(module.forward).parameters
        and getattr(module, "pad_mode", "") != "replicate",
        ValueError,
        lambda: (
            f"time_parallel: {path} carries a convolution cache from one frame batch to the next: the "
            "VAE's encode runs its encoder over frame batches in sequence (each normalised with its own "
            "statistics), so no split of the frames over ranks reproduces it exactly (CogVideoX)"
        ),
    )
    if hasattr(module, "time_causal_padding"):
        front, back = module.time_causal_padding[4], module.time_causal_padding[5]
    else:
        front, back = (kernel - 1, 0) if module.is_causal else ((kernel - 1) // 2, (kernel - 1) // 2)
    raise_if(
        back or front != kernel - 1 or conv.padding[0] or conv.dilation[0] != 1 or kernel < stride,
        ValueError,
        lambda: (
            f"time_parallel: {path} is not a causal temporal convolution (kernel {kernel}, stride {stride}, "
            f"padding {front} before and {back} after the frames); only causal ones split exactly"
        ),
    )
    return _Conv(conv, kernel, stride, front)


def _plain_conv(conv: nn.Conv3d, path: str) -> _Conv:
    """An ``nn.Conv3d`` called directly: Wan's causal conv (``_padding``, ``cache_x``)."""
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    front = getattr(conv, "_padding", (0,) * 6)[4]
    cached = hasattr(conv, "_padding") and "cache_x" in inspect.signature(conv.forward).parameters
    if cached and conv.padding[0] == 0 and conv.dilation[0] == 1 and kernel >= stride:
        if front == kernel - 1 and stride == 1:
            return _Conv(conv, kernel, stride, None)
        if front == 0:  # the caller prepends kernel - stride cached frames (Wan's time downsampling)
            return _Conv(conv, kernel, stride, kernel - stride)
    raise ValueError(
        f"time_parallel: {path} is a temporal convolution (kernel {kernel}, stride {stride}) that is not "
        "causal in a way these hooks recognise"
    )


# ---- one call's exchanges -----------------------------------------------------------------------
class _Run(TorchFunctionMode):
    """One rank's state during one time-parallel encode: who it is and whether its hooks exchange. Entered as
    a torch function mode, it routes clip-wide GroupNorms and frame-causal attention through its exchanges."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group, self.rank, self.world = group, dist.get_rank(group), dist.get_world_size(group)
        self.empty = False  # no frames of its own in this pass (a dummy span keeps the collectives)
        self.enabled = False  # off during Wan's first chunk
        self.attention = False  # inside an attention with a frame-causal mask
        self.problem = ""

    def boundary(self, own: torch.Tensor, width: int, need: int) -> torch.Tensor | None:
        """The ``need`` frames before this rank's ``own: (b, c, n, h, w)``; None on rank 0.

        Every rank offers the last ``<= width`` frames of ``own`` (rank 0's start with its padding);
        a rank whose span is shorter than ``need`` is looked through to the ranks before it.
        """
        count = min(own.size(2), width)
        tail = F.pad(own[:, :, own.size(2) - count :], (0, 0, 0, 0, width - count, 0))  # zeros in front
        rows = _all_gather_rows(torch.cat([tail.reshape(-1), tail.new_tensor([count])]), self.group)
        if self.rank == 0:
            return None
        # each row: a rank's tail, then how many of its last frames it offers
        frames = [
            part[:-1].view(tail.shape)[:, :, width - int(part[-1].item()) :] for part in rows[: self.rank]
        ]
        return torch.cat(frames, 2)[:, :, -need:] if need else own[:, :, :0]

    def own(self, x: torch.Tensor, context: int) -> torch.Tensor:
        """This rank's frames of a layer input whose first ``context`` frames are context."""
        if self.rank == 0:
            return x[:, :, :context] if self.empty else x
        return x[:, :, x.size(2) :] if self.empty else x[:, :, context:]

    def attention_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None:
            return
        if _frame_causal(mask):
            self.attention = True
        else:
            self.problem = f"{type(module).__name__} has an attention mask that is not causal over frames"

    def attention_post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.attention = False

    def group_norm(self, input, num_groups, weight=None, bias=None, eps=1e-5):  # noqa: A002 - F.group_norm's names
        """GroupNorm of ``input: (b, C, ...)`` with the statistics of every rank's frames together."""
        b, channels = input.shape[:2]
        flat = input.reshape(b, num_groups, -1)
        keep = 0.0 if self.empty else 1.0
        stats = torch.stack(
            [
                flat.sum(-1, dtype=torch.float64) * keep,
                flat.pow(2).sum(-1, dtype=torch.float64) * keep,
                torch.full((b, num_groups), flat.size(-1) * keep, dtype=torch.float64, device=input.device),
            ],
            -1,
        )
        dist.all_reduce(stats, group=self.group)
        mean = stats[..., 0] / stats[..., 2]
        rstd = (stats[..., 1] / stats[..., 2] - mean.square()).clamp_min(0).add(eps).rsqrt()
        compute = torch.promote_types(input.dtype, torch.float32)
        out = (
            (flat.to(compute) - mean.to(compute)[..., None])
            .mul_(rstd.to(compute)[..., None])
            .view(input.shape)
        )
        shape = (1, channels) + (1,) * (input.dim() - 2)
        if weight is not None:
            out.mul_(weight.to(compute).view(shape))
        if bias is not None:
            out.add_(bias.to(compute).view(shape))
        return out.to(input.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            self.enabled
            and func is F.group_norm
            and (args[0].dim() == 5 or (self.attention and args[0].dim() == 3))
        ):
            return self.group_norm(*args, **kwargs)
        if self.enabled and self.attention and func is F.scaled_dot_product_attention:
            return self.attention_over_frames(*args, **kwargs)
        return func(*args, **kwargs)

    def attention_over_frames(self, q, k, v, attn_mask=None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """SDPA of this rank's queries over the keys and values of the ranks before and its own."""
        own = torch.cat([k, v], -1)
        lengths = _all_gather_rows(
            torch.tensor([0 if self.empty else own.size(-2)], device=own.device), self.group
        )
        lengths = lengths.view(-1).tolist()
        earlier = sum(lengths[: self.rank])
        before = _all_gather_cat(own[..., : lengths[self.rank], :], lengths, own.dim() - 2, self.group)
        keys, values = torch.cat([before[..., :earlier, :], own], -2).split(k.size(-1), -1)
        if attn_mask is not None and earlier:
            visible = attn_mask.new_ones if attn_mask.dtype == torch.bool else attn_mask.new_zeros
            attn_mask = torch.cat([visible((*attn_mask.shape[:-1], earlier)), attn_mask], -1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask, *args, **kwargs)


def _conv_hook(run: _Run, conv: _Conv, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """Forward pre-hook of a causal conv: the frames before the span, written over the ``conv.context`` frames
    of padding or cache in front of its input, or passed as Wan's ``cache_x`` (``conv.context`` None)."""
    if not run.enabled:
        return None
    x, width = args[0], conv.kernel - 1
    if conv.context is not None:
        halo = run.boundary(run.own(x, conv.context), width, conv.kernel - conv.stride)
        if halo is None:
            return None
        # The context frames are padding or a cache the caller has just concatenated in front: write
        # the real frames over them (no copy of the input; the encode runs under no_grad).
        start = conv.context - halo.size(2)
        x[:, :, start : conv.context].copy_(halo)
        return (x[:, :, start:], *args[1:]), kwargs
    own = run.own(x, 0)
    if run.rank == 0:  # its padding (zeros) and cache come before its frames
        cache = args[1] if len(args) > 1 else kwargs.get("cache_x")
        cache = [] if cache is None else [cache.to(x.device)]
        own = torch.cat([x.new_zeros((*x.shape[:2], width, *x.shape[3:])), *cache, own], 2)
    halo = run.boundary(own, width, width)
    if halo is None:
        return None
    return (x, halo), {k: v for k, v in kwargs.items() if k != "cache_x"}


def _chunk_hook(run: _Run, span: torch.Tensor) -> Callable:
    """Before each call of Wan's encoder: the first chunk runs locally; the second becomes the span."""
    calls = itertools.count()

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        item, second = divmod(next(calls), 2)
        run.enabled = bool(second)
        if not second:
            return None
        x = args[0] if args else kwargs["x"]
        chunk = span if x.size(0) == span.size(0) else span[item : item + 1]  # use_slicing: one clip
        rest = {k: v for k, v in kwargs.items() if k != "x"}
        return (chunk, *args[1:]), rest

    return hook


def _frame_causal(mask: torch.Tensor) -> bool:
    """Whether ``mask: (..., n, n)`` lets token i see exactly the tokens of its frame and earlier ones."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if mask.dtype != torch.bool and not torch.isneginf(mask.masked_select(~allowed)).all():
        return False
    n = allowed.size(-1)
    counts = allowed.sum(-1)
    per = int(counts.reshape(-1)[0].item())
    if per < 1 or n % per or allowed.size(-2) != n:
        return False
    index = torch.arange(n, device=mask.device)
    if not bool((counts == (index // per + 1) * per).all()):
        return False
    return bool((allowed == (index < counts[..., None])).all())
