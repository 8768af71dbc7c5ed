"""Tensor parallelism inside transformer blocks with torch's DTensor ``parallelize_module``.

In each block the projections into attention (q, k, v; joint attention's ``add_q/k/v_proj``) and the
MLP's input projection are split column-wise (``ColwiseParallel``: each rank computes ``heads / tp``
heads and ``hidden / tp`` MLP features, output ``(b, s, out / tp)`` local); attention's output and the
MLP's output projection row-wise (``RowwiseParallel``: input ``(b, s, in / tp)``, partial products
all-reduced, output ``(b, s, out)`` replicated). Everything else (adaLN modulation, norms, embeddings)
stays replicated: its inputs and output gradients are identical on every TP rank, so are its gradients.
An attention gets its local head counts and widths (``heads / tp``, ``kv_heads / tp``, ``inner_dim / tp``:
what its reshapes and position biases read); a per-head position-bias table (T5's ``relative_attention_bias``,
``(buckets, heads)``) is split over heads as q is. The same split runs forward-only on frozen text encoders
(transformers' T5, CLIP, BERT): each rank computes its heads, the output is the whole encoder's.
Its QK-norms (``norm_q``, ``norm_k``, ``norm_added_*``: over head_dim, on this rank's heads) keep their
weights replicated but their gradients summed over TP (``SequenceParallel`` on a dim other than the last:
each rank normalizes its own rows, the weight gradient is a partial sum).

A fused row-wise projection over a packed input (diffusers' ``PackedRowwiseParallel``, e.g. Flux's
single-stream ``proj_out`` over ``cat(attention, mlp)``) stays replicated: its packed input is
all-gathered part by part before it (gradient: each rank keeps its slice, no communication).
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from litegen_zero._shard import _check_model, find_blocks, raise_if

logger = logging.getLogger(__name__)

Plan = Mapping[str, ParallelStyle | str]
_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
_HEAD_ATTRS = ("heads", "num_heads", "n_heads", "num_attention_heads")
_KV_HEAD_ATTRS = ("kv_heads", "num_kv_heads", "num_key_value_heads")
_WIDTH_ATTRS = ("inner_dim", "inner_kv_dim", "all_head_size")  # heads * head_dim: local too
_QKV_NAMES = (
    ("to_q", "to_k", "to_v"),
    ("q", "k", "v"),
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
)
_JOINT_INPUT_NAMES = ("add_q_proj", "add_k_proj", "add_v_proj")
_OUTPUT_NAMES = ("to_out", "to_out.0", "out", "out_proj", "o_proj", "o", "proj")
_JOINT_OUTPUT_NAMES = ("to_add_out",)
_HEAD_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k", "q_norm", "k_norm")
_SPLITTABLE = (nn.Linear, nn.Embedding)


def tensor_parallel(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    plan: Plan | None = None,
    blocks: Sequence[nn.Module] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    strict: bool = True,
) -> nn.Module:
    """Split each block's attention and MLP projections over the 1-D ``mesh`` (the TP group); in place.

    ``plan``: torch's plan, ``{module name or fnmatch pattern ("blocks.*.attn.to_q"): ParallelStyle,
    "colwise" or "rowwise"}``. Default: the model's ``_tp_plan`` (diffusers' Flux, Flux2, QwenImage),
    else found by structure in ``blocks`` (default ``find_blocks(model)``):

    - an attention is a module with a head count (``heads``, ``num_heads``, ``n_heads``,
      ``num_attention_heads``) and Linear children ``to_q/to_k/to_v`` (or ``q/k/v``, ``q_proj/k_proj/v_proj``,
      ``query/key/value``; joint ``add_*_proj``): those column-wise; its output ``to_out``/``out``/``o``/
      ``out_proj`` (joint ``to_add_out``) row-wise, or, without one of its own, the block's next Linear after
      it when that maps ``heads * head_dim -> dim`` (BERT's ``attention.output.dense``); an ``nn.Embedding``
      child over its heads (T5's ``relative_attention_bias``, ``(buckets, heads)``) splits its heads too;
    - an MLP is a module whose Linears (outside attentions) are two chained ``dim -> hidden -> dim``, or
      sibling inputs ``dim -> hidden`` (gated: T5's ``wi_0, wi_1``; ``hidden != dim``) then ``hidden -> dim``;
      a fused gated ``2 * hidden`` input is not split.

    Each split attention gets its local head counts and widths (``heads / tp``, ``kv_heads / tp``,
    ``inner_dim / tp``, ``all_head_size / tp``). Head counts and widths are checked on every rank before any
    collective. ``strict=False`` leaves blocks with nothing to split replicated instead of raising (frozen
    encoders). ``optimizer``, built on ``model`` and without state yet, is pointed at the new (DTensor)
    parameters. Returns ``model``; ``shard()`` / ``shard_frozen()`` come after.
    """
    _check_model(model)
    raise_if(
        not isinstance(mesh, DeviceMesh) or mesh.ndim != 1,
        ValueError,
        f"mesh={mesh!r}; allowed: a 1-D DeviceMesh of the tensor-parallel ranks",
    )
    tp = mesh.size()
    source = "the given plan"
    if plan is None:
        plan = getattr(model, "_tp_plan", None)
        source = "the model's _tp_plan" if plan else "structure"
        plan = plan or _plan_by_structure(model, blocks, strict)
    styles, packed = _expand(model, plan)
    norms = _split_attentions(model, styles, tp)  # its checks raise on every rank before any collective
    styles.update(norms)
    if tp > 1 and (styles or packed):
        names = {id(p): n for n, p in model.named_parameters()}
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        parallelize_module(model, mesh, styles)
        new = dict(model.named_parameters())
        for name in frozen & new.keys():  # SequenceParallel's new norm weights require grad by default
            new[name].requires_grad_(False)
        for group in optimizer.param_groups if optimizer is not None else []:
            group["params"] = [new[names[id(p)]] if id(p) in names else p for p in group["params"]]
        for name, parts in packed.items():
            model.get_submodule(name).register_forward_pre_hook(
                functools.partial(_gather_packed, mesh, parts)
            )
        for name in norms:  # their output is a view of a DTensor's local tensor: attention processors that
            # write into q / k in place (CogVideoX's rotary on the video tokens) need a tensor of their own
            model.get_submodule(name).register_forward_hook(_own_output)
    if dist.get_rank() == 0:
        logger.info(
            "tensor_parallel: %s: %d projections split over %d ranks (from %s), %d packed kept replicated",
            type(model).__name__,
            len(styles),
            tp,
            source,
            len(packed),
        )
    return model


def _own_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the output as a tensor of its own, not a view."""
    return output.clone()


def _gather_packed(mesh: DeviceMesh, parts: list[int], module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: ``x (..., n / tp)`` holding each rank's slice of every packed part -> ``(..., n)``."""
    x, *rest = args
    pieces = x.split([x.shape[-1] * p // sum(parts) for p in parts], dim=-1)
    full = [DTensor.from_local(p, mesh, [Shard(x.dim() - 1)], run_check=False).full_tensor() for p in pieces]
    return (torch.cat(full, dim=-1), *rest)


def _plan_by_structure(model: nn.Module, blocks: Sequence[nn.Module] | None, strict: bool) -> dict[str, str]:
    """Column-wise attention inputs and MLP inputs, row-wise outputs, of every block; a block with none ->
    error (``strict``) or left replicated."""
    names = {id(m): n for n, m in model.named_modules()}
    plan: dict[str, str] = {}
    for block in list(blocks) if blocks is not None else find_blocks(model):
        prefix = names[id(block)]
        attention = _attention_plan(block)
        found = attention | _mlp_plan(block, set(attention))
        if not found and strict:
            unplaced = [  # attentions with q/k/v but no output projection the structure can place
                n or "(the block)"
                for n, m in block.named_modules()
                if _heads(m) is not None and _qkv(m) is not None
            ]
            why = (
                f": its attention {', '.join(unplaced)} has q/k/v but no output projection of its own (a fused "
                "projection over a concatenation, e.g. cat(attention, mlp) in a single-stream block, whose packed "
                "layout the structure does not tell)"
            )
            raise ValueError(
                f"tensor_parallel: block {prefix!r} ({type(block).__name__}) has no linear layer the plan can "
                f"place{why if unplaced else ''} (attention with a heads attribute and q/k/v + output Linears, or an "
                "MLP of two chained Linears); allowed: pass plan={module name: 'colwise' | 'rowwise' | "
                "ParallelStyle} for this model (the facade: initialize(..., tp_plan=...))"
            )
        plan.update({f"{prefix}.{name}": style for name, style in found.items()})
    return plan


def _heads(module: nn.Module) -> int | None:
    """The module's head count, None if it has none."""
    return next(
        (
            v
            for a in _HEAD_ATTRS
            if isinstance(v := getattr(module, a, None), int) and not isinstance(v, bool)
        ),
        None,
    )


def _qkv(module: nn.Module) -> tuple[str, str, str] | None:
    return next((names for names in _QKV_NAMES if all(_is_linear(module, n) for n in names)), None)


def _attention_plan(block: nn.Module) -> dict[str, str]:
    """Attentions with q/k/v and an output: those column-, that row-wise; joint ``add_*_proj`` (same heads) with
    them, ``to_add_out`` row-wise when present (a context-pre-only block drops its text output); a per-head
    ``nn.Embedding`` (position-bias table) column-wise."""
    plan: dict[str, str] = {}
    for name, module in block.named_modules():
        heads, qkv = _heads(module), _qkv(module)
        if heads is None or qkv is None:
            continue
        prefix = f"{name}." if name else ""
        output = next((prefix + n for n in _OUTPUT_NAMES if _is_linear(module, n)), None)
        output = output or _following_output(block, name, module.get_submodule(qkv[0]))
        if output is None:
            continue
        joint_ins = [n for n in _JOINT_INPUT_NAMES if _is_linear(module, n)]
        tables = [
            n for n, m in module.named_children() if isinstance(m, nn.Embedding) and m.embedding_dim == heads
        ]
        plan.update({prefix + n: "colwise" for n in [*qkv, *joint_ins, *tables]})
        plan.update(
            {output: "rowwise"}
            | {prefix + n: "rowwise" for n in _JOINT_OUTPUT_NAMES if _is_linear(module, n)}
        )
    return plan


def _following_output(block: nn.Module, attention: str, query: nn.Linear) -> str | None:
    """The block's first Linear after the attention ``attention`` (registration order), if it maps
    ``heads * head_dim -> dim`` (``query``'s widths reversed): the output of an attention without its own."""
    inside, after = f"{attention}." if attention else "", False
    for name, module in block.named_modules():
        if name == attention or name.startswith(inside):
            after = True
        elif after and isinstance(module, nn.Linear):
            fits = module.in_features == query.out_features and module.out_features == query.in_features
            return name if fits else None
    return None


def _mlp_plan(block: nn.Module, claimed: set[str]) -> dict[str, str]:
    """MLPs among the Linears no attention claimed, outermost first; modules holding an attention's unclaimed
    Linears (an attention that could not be placed) are not searched as a whole."""
    in_attention = {  # the Linears of modules with a head count and Linears of their own
        f"{name}.{n}" if name else n
        for name, module in block.named_modules()
        if _heads(module) is not None and any(isinstance(c, nn.Linear) for c in module.children())
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear)
    }
    plan: dict[str, str] = {}
    found: list[str] = []
    for name, module in block.named_modules():
        if any(
            mlp == "" or name.startswith(f"{mlp}.") for mlp in found
        ):  # inside an MLP (or the block is one)
            continue
        prefix = f"{name}." if name else ""
        linears = [
            (prefix + n, m)
            for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and prefix + n not in claimed
        ]
        if any(n in in_attention for n, _ in linears):
            continue
        styles = _mlp_styles(linears)
        if styles:
            plan.update(styles)
            found.append(name)
    return plan


def _mlp_styles(linears: list[tuple[str, nn.Linear]]) -> dict[str, str]:
    """``dim -> hidden -> dim`` (two chained), or sibling inputs ``dim -> hidden`` then ``hidden -> dim``."""
    if len(linears) < 2:
        return {}
    *ins, (out_name, out) = linears
    if len(ins) == 1:
        return (
            {ins[0][0]: "colwise", out_name: "rowwise"} if ins[0][1].out_features == out.in_features else {}
        )
    dim, hidden = ins[0][1].in_features, out.in_features
    siblings = len({n.rpartition(".")[0] for n, _ in linears}) == 1
    gated = all(m.in_features == dim and m.out_features == hidden for _, m in ins) and dim != hidden
    return {**{n: "colwise" for n, _ in ins}, out_name: "rowwise"} if siblings and gated else {}


def _is_linear(module: nn.Module, name: str) -> bool:
    try:
        return isinstance(module.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def _expand(model: nn.Module, plan: Plan) -> tuple[dict[str, ParallelStyle], dict[str, list[int]]]:
    """Plan patterns -> ``{Linear / Embedding name: style}`` and the packed row-wise Linears ``{name: part sizes}``."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, _SPLITTABLE)}
    styles: dict[str, ParallelStyle] = {}
    packed: dict[str, list[int]] = {}
    for pattern, style in plan.items():
        matches = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        raise_if(
            not matches,
            ValueError,
            f"tensor_parallel: plan entry {pattern!r} matches no nn.Linear or nn.Embedding of "
            f"{type(model).__name__}; allowed: names or fnmatch patterns of Linear / Embedding submodules",
        )
        kind = type(style).__name__
        for name in matches:
            if kind == "PackedRowwiseParallel":  # diffusers' packed layout: kept whole, its input gathered
                packed[name] = list(
                    style.blocks or getattr(linears[name], "_tp_packed_row_blocks", None) or []
                )
                raise_if(
                    not packed[name],
                    ValueError,
                    f"tensor_parallel: {name!r} is PackedRowwiseParallel without blocks",
                )
            elif isinstance(style, str) and style in _STYLES:
                styles[name] = _STYLES[style]()
            elif isinstance(style, ParallelStyle):
                styles[name] = style
            else:
                raise ValueError(
                    f"tensor_parallel: plan entry {pattern!r} = {style!r}; allowed: 'colwise', 'rowwise', "
                    "a torch ParallelStyle, or diffusers' PackedRowwiseParallel (kept replicated); "
                    f"{kind} cannot be split exactly here: leave {name!r} out of the plan"
                )
    return styles, packed


def _split_attentions(
    model: nn.Module, styles: dict[str, ParallelStyle], tp: int
) -> dict[str, ParallelStyle]:
    """Check every head count and split width against ``tp``, then give each attention whose q/k are split its
    local counts and widths (``heads``, ``kv_heads``, ``inner_dim``, ``all_head_size``: the ones reshapes and
    biases use). Returns its QK-norms with weights: rows split, gradients summed over TP. A QK-norm over all
    heads at once (Wan's ``rms_norm_across_heads``) cannot be split exactly: refused."""
    owners = {n.rsplit(".", 1)[0] for n, s in styles.items() if isinstance(s, ColwiseParallel) and "." in n}
    norms, changes = {}, []
    for owner in sorted(owners):
        attention = model.get_submodule(owner)
        heads = _heads(attention)
        query = next((f"{owner}.{q}" for q, _, _ in _QKV_NAMES if f"{owner}.{q}" in styles), None)
        for name in _HEAD_NORMS:
            norm = getattr(attention, name, None)
            if not isinstance(norm, nn.Module) or not heads or query is None:
                continue
            head_dim = model.get_submodule(query).out_features // heads
            shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
            size = int(shape[-1]) if isinstance(shape, (tuple, list, torch.Size)) else head_dim
            raise_if(
                size != head_dim,
                ValueError,
                f"tensor_parallel: {owner}.{name} ({type(norm).__name__}) normalizes {size} features, all heads "
                f"at once (head_dim is {head_dim}); a split over heads changes it: allowed: a plan that leaves "
                f"{owner} replicated, or tp_size 1",
            )
            if any(True for _ in norm.parameters()):
                norms[f"{owner}.{name}"] = SequenceParallel(sequence_dim=0, use_local_output=True)
        for attr in _HEAD_ATTRS + _KV_HEAD_ATTRS + (_WIDTH_ATTRS if heads is not None else ()):
            count = getattr(attention, attr, None)
            if isinstance(count, int) and not isinstance(count, bool):
                if count % tp:
                    raise ValueError(
                        f"tensor_parallel: {owner} ({type(attention).__name__}) has {attr}={count}, not divisible "
                        f"by tp_size={tp}; allowed: tp_size in {[d for d in range(1, count + 1) if count % d == 0]}"
                    )
                changes.append((attention, attr, count // tp))
    for name, style in styles.items():
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Embedding):  # colwise: its embedding dim; rowwise: its rows
            width = layer.embedding_dim if isinstance(style, ColwiseParallel) else layer.num_embeddings
        else:
            width = layer.out_features if isinstance(style, ColwiseParallel) else layer.in_features
        raise_if(
            width % tp != 0,
            ValueError,
            f"tensor_parallel: {name} splits {width} features over tp_size={tp}; allowed: a tp_size "
            f"dividing {width}",
        )
    for module, attr, local in changes:
        setattr(module, attr, local)
    return norms
