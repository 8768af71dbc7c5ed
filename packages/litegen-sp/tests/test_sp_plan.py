"""sequence_parallel on an unmodified tiny DiT equals the single-rank model (outputs and gradients)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from litegen_sp import SPPlan, sequence_parallel
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

DIM, HEADS, TEXT_DIM, TEXT_LEN, IMAGE, PATCH = 24, 4, 16, 5, 6, 2  # 9 image tokens, 5 text tokens


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, s, c = x.shape
        context = x if context is None else context
        q = self.to_q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, s, c))


class Block(nn.Module):
    """adaLN DiT block: self-attention, cross-attention to text, MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.attn = Attention(DIM, HEADS)
        self.norm2 = nn.LayerNorm(DIM)
        self.cross_attn = Attention(DIM, HEADS, DIM)
        self.norm3 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(DIM, 2 * DIM), nn.GELU(approximate="tanh"), nn.Linear(2 * DIM, DIM)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(DIM, 6 * DIM))

    def forward(self, x, cond, text, bias=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).unsqueeze(1).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1 * self.attn(h if bias is None else h + bias)
        x = x + self.cross_attn(self.norm2(x), text)
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))


class TinyDiT(nn.Module):
    """patch embed -> blocks (self-attn, cross-attn to text, MLP, adaLN) -> adaLN head -> unpatchify."""

    def __init__(self, depth: int = 2, token_bias: bool = False) -> None:
        super().__init__()
        tokens = (IMAGE // PATCH) ** 2
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.pos = nn.Parameter(torch.randn(1, tokens, DIM) * 0.1)
        self.token_bias = nn.Parameter(torch.randn(1, tokens, DIM) * 0.1) if token_bias else None
        self.t_embed = nn.Sequential(nn.Linear(DIM, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.text_proj = nn.Linear(TEXT_DIM, DIM)
        self.blocks = nn.ModuleList([Block() for _ in range(depth)])
        self.final_norm = nn.LayerNorm(DIM, elementwise_affine=False)
        self.final_ada = nn.Linear(DIM, 2 * DIM)
        self.head = nn.Linear(DIM, PATCH * PATCH * 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        freqs = torch.exp(-math.log(1e4) * torch.arange(DIM // 2) / (DIM // 2))
        angles = t[:, None] * 1000 * freqs[None]
        cond = self.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1))
        text = self.text_proj(text)
        for block in self.blocks:
            tokens = block(tokens, cond, text, bias=self.token_bias)
        shift, scale = self.final_ada(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)
        out = self.head(modulate(self.final_norm(tokens), shift, scale))
        side = height // PATCH
        out = out.view(b, side, side, PATCH, PATCH, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, height, width)


def sp_dit_matches_single_rank(sp_size: int, token_bias: bool, checkpoint: str, fsdp: bool) -> dict:
    """SP (x DP) run of TinyDiT vs the single-process full batch; world-averaged gradients."""
    world, rank = dist.get_world_size(), dist.get_rank()
    dp_size = world // sp_size
    mesh = init_device_mesh("cpu", (dp_size, sp_size), mesh_dim_names=("dp", "sp"))
    dp_rank = mesh.get_local_rank("dp")
    torch.manual_seed(0)
    reference = TinyDiT(token_bias=token_bias)
    model = copy.deepcopy(reference)
    per_dp = 2
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(dp_size * per_dp, 3, IMAGE, IMAGE, generator=gen)
    t = torch.rand(dp_size * per_dp, generator=gen)
    text = torch.randn(dp_size * per_dp, TEXT_LEN, TEXT_DIM, generator=gen)
    target = torch.randn_like(x)

    expected = reference(x, t, text)
    F.mse_loss(expected, target).backward()

    plan = SPPlan(split={"bias": 1}) if token_bias else None
    if checkpoint == "before":
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    sequence_parallel(model, mesh.get_group("sp"), plan)
    if checkpoint == "after":
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    if fsdp:
        world_mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=world_mesh)
        fully_shard(model, mesh=world_mesh)
    mine = slice(dp_rank * per_dp, (dp_rank + 1) * per_dp)
    out = model(x[mine], t[mine], text[mine])
    F.mse_loss(out, target[mine]).backward()

    ref_grads = dict(reference.named_parameters())
    grad_err, names = 0.0, []
    for name, param in model.named_parameters():
        if fsdp:
            grad = param.grad.full_tensor()  # FSDP2 already averaged over the world
        else:
            grad = param.grad.clone()
            dist.all_reduce(grad)
            grad /= world
        name = name.replace("_checkpoint_wrapped_module.", "")
        names.append(name)
        grad_err = max(grad_err, (grad - ref_grads[name].grad).abs().max().item())
    return {
        "out_err": (out - expected[mine]).abs().max().item(),
        "grad_err": grad_err,
        "params": sorted(names) == sorted(ref_grads),
        "rank": rank,
    }


class Joint(nn.Module):
    """Attention over [text, image] concatenated: not expressible with SPPlan."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention(DIM, HEADS)

    def forward(self, x, text):
        return self.attn(torch.cat([text, x], dim=1))[:, text.shape[1] :]


class JointModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Joint()])

    def forward(self, x, text):
        return self.layers[0](x, text)


def bad_plans_raise() -> list[tuple[str, str]]:
    group = dist.group.WORLD
    cases = {
        "blocks_path": lambda: sequence_parallel(TinyDiT(), group, SPPlan(blocks="nope")),
        "blocks_type": lambda: sequence_parallel(TinyDiT(), group, SPPlan(blocks="head")),
        "no_blocks": lambda: sequence_parallel(nn.Linear(2, 2), group),
        "plan_type": lambda: sequence_parallel(TinyDiT(), group, {"blocks": "blocks"}),
        "cross_type": lambda: sequence_parallel(TinyDiT(), group, SPPlan(cross_attention="cross")),
        "twice": lambda: sequence_parallel(sequence_parallel(TinyDiT(), group), group),
        "joint": lambda: sequence_parallel(JointModel(), group)(
            torch.randn(1, 4, DIM), torch.randn(1, 3, DIM)
        ),
        "split_len": lambda: sequence_parallel(TinyDiT(token_bias=True), group, SPPlan(split={"text": 1}))(
            torch.randn(1, 3, IMAGE, IMAGE), torch.rand(1), torch.randn(1, TEXT_LEN, TEXT_DIM)
        ),
    }
    results = []
    for name, call in cases.items():
        try:
            call()
        except (ValueError, TypeError) as exc:
            results.append((name, str(exc)))
        else:
            results.append((name, "no error"))
    return results


def test_bad_plans_raise_clear_errors(dist_pool):
    expected = {
        "blocks_path": "'nope'",
        "blocks_type": "nn.ModuleList",
        "no_blocks": "SPPlan(blocks=",
        "plan_type": "SPPlan",
        "cross_type": "cross_attention",
        "twice": "already sequence-parallel",
        "joint": "joint attention",
        "split_len": "9 tokens",
    }
    for per_rank in dist_pool.run(bad_plans_raise, world_size=2):
        for name, message in per_rank:
            assert expected[name] in message, (name, message)


@pytest.mark.parametrize(
    "world_size, sp_size, token_bias, checkpoint, fsdp",
    [
        (2, 2, False, "none", False),
        (2, 2, False, "after", False),
        (2, 2, False, "before", False),
        (4, 4, False, "none", False),
        (4, 4, True, "after", False),
        (4, 2, False, "none", False),  # 2 data-parallel pairs with different samples x SP 2
        (4, 2, True, "after", True),  # the facade's order: SP plan -> activation checkpointing -> FSDP2
    ],
)
def test_sp_dit_equals_single_rank(dist_pool, world_size, sp_size, token_bias, checkpoint, fsdp):
    per_rank = dist_pool.run(
        sp_dit_matches_single_rank, sp_size, token_bias, checkpoint, fsdp, world_size=world_size
    )
    for result in per_rank:
        assert result["params"], result
        assert result["out_err"] <= 1e-5, result
        assert result["grad_err"] <= 1e-5, result
