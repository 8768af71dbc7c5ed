"""sequence_parallel on unmodified models of three styles equals the single-rank model.

Cross-attention DiT (text replicated, a per-token bias found by length), joint-attention MMDiT (two
streams, text first, a joint rotary table and a joint key mask computed outside the blocks, blocks
returning both streams) and a video DiT (rotary table of the video tokens, text replicated): outputs
and every parameter's world-averaged gradient match one process, with activation checkpointing and
FSDP2 applied after SP as the facade does. Token counts the group size does not divide are included.
"""

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


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: (b, h, s, d); table: (s, d) angles -> x rotated pairwise by them."""
    cos, sin = table.cos()[None, None], table.sin()[None, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope: torch.Tensor | None = None):
        b, s, c = x.shape
        context = x if context is None else context
        q = self.to_q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, s, c))


class Block(nn.Module):
    """adaLN DiT block: self-attention (optional rotary table), cross-attention to text, MLP."""

    def __init__(self, heads: int = HEADS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.attn = Attention(DIM, heads)
        self.norm2 = nn.LayerNorm(DIM)
        self.cross_attn = Attention(DIM, heads, DIM)
        self.norm3 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(DIM, 2 * DIM), nn.GELU(approximate="tanh"), nn.Linear(2 * DIM, DIM)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(DIM, 6 * DIM))

    def forward(self, x, cond, text, bias=None, rope=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).unsqueeze(1).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1 * self.attn(h if bias is None else h + bias, rope=rope)
        x = x + self.cross_attn(self.norm2(x), text)
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))


def time_embedding(t: torch.Tensor) -> torch.Tensor:
    freqs = torch.exp(-math.log(1e4) * torch.arange(DIM // 2) / (DIM // 2))
    angles = t[:, None] * 1000 * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rope_table(length: int, offset: int = 0, heads: int = HEADS) -> torch.Tensor:
    """(length, DIM // heads) rotary angles of positions offset..offset+length."""
    half = DIM // heads // 2
    angles = (torch.arange(length) + offset)[:, None] * torch.exp(-torch.arange(half) / half)[None]
    return torch.cat([angles, angles], dim=-1)


class TinyDiT(nn.Module):
    """patch embed -> blocks (self-attn, cross-attn to text, MLP, adaLN) -> adaLN head -> unpatchify.

    ``token_bias``: a learned per-token bias handed to every block (found by length under SP);
    ``rope``: rotary angles of the image tokens, computed outside the blocks.
    """

    def __init__(
        self, depth: int = 2, token_bias: bool = False, rope: bool = False, heads: int = HEADS
    ) -> None:
        super().__init__()
        tokens = (IMAGE // PATCH) ** 2
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.pos = nn.Parameter(torch.randn(1, tokens, DIM) * 0.1)
        self.token_bias = nn.Parameter(torch.randn(1, tokens, DIM) * 0.1) if token_bias else None
        self.rope = rope
        self.t_embed = nn.Sequential(nn.Linear(DIM, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.text_proj = nn.Linear(TEXT_DIM, DIM)
        self.heads = heads
        self.blocks = nn.ModuleList([Block(heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(DIM, elementwise_affine=False)
        self.final_ada = nn.Linear(DIM, 2 * DIM)
        self.head = nn.Linear(DIM, PATCH * PATCH * 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        cond = self.t_embed(time_embedding(t))
        text = self.text_proj(text)
        rope = rope_table(tokens.shape[1], heads=self.heads) if self.rope else None
        for block in self.blocks:
            tokens = block(tokens, cond, text, bias=self.token_bias, rope=rope)
        shift, scale = self.final_ada(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)
        out = self.head(modulate(self.final_norm(tokens), shift, scale))
        side = height // PATCH
        out = out.view(b, side, side, PATCH, PATCH, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, height, width)


class JointBlock(nn.Module):
    """MMDiT block: each stream its own projections and MLP, one attention over [text, image]."""

    def __init__(self, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.img_qkv, self.txt_qkv = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, 3 * DIM)
        self.img_out, self.txt_out = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.img_mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.txt_mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.norm = nn.LayerNorm(DIM)
        self.ada = nn.Linear(DIM, 2 * DIM)

    def forward(self, img, txt, cond, rope, mask):
        shift, scale = self.ada(cond).unsqueeze(1).chunk(2, dim=-1)
        b = img.shape[0]
        qi, ki, vi = (
            self.img_qkv(modulate(self.norm(img), shift, scale))
            .view(b, -1, 3, self.heads, DIM // self.heads)
            .unbind(2)
        )
        qt, kt, vt = self.txt_qkv(self.norm(txt)).view(b, -1, 3, self.heads, DIM // self.heads).unbind(2)
        q, k, v = (torch.cat([t_, i_], dim=1).transpose(1, 2) for t_, i_ in ((qt, qi), (kt, ki), (vt, vi)))
        q, k = rotate(q, rope), rotate(k, rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        out_txt, out_img = out.split([txt.shape[1], img.shape[1]], dim=1)
        img = img + self.img_out(out_img)
        txt = txt + self.txt_out(out_txt)
        return img + self.img_mlp(img), txt + self.txt_mlp(txt)


class TinyMMDiT(nn.Module):
    """Image and text streams through joint blocks; rotary table and key mask over [text, image]."""

    def __init__(self, depth: int = 2, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.text_proj = nn.Linear(TEXT_DIM, DIM)
        self.t_embed = nn.Sequential(nn.Linear(DIM, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.layers = nn.ModuleList([JointBlock(heads) for _ in range(depth)])
        self.head = nn.Linear(DIM, PATCH * PATCH * 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        img = self.patch_embed(x).flatten(2).transpose(1, 2)
        txt = self.text_proj(text)
        cond = self.t_embed(time_embedding(t))
        rope = torch.cat(
            [rope_table(txt.shape[1], heads=self.heads), rope_table(img.shape[1], 100, self.heads)]
        )
        padding = text[:, :, 0] < -0.5  # text tokens that are padding (about 3 in 10)
        mask = torch.cat([~padding, torch.ones(b, img.shape[1], dtype=torch.bool)], dim=1)[:, None, None]
        for layer in self.layers:
            img, txt = layer(img, txt, cond, rope, mask)
        out = self.head(img)
        side = height // PATCH
        return out.view(b, side, side, PATCH, PATCH, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


MODELS = {
    "cross": (lambda: TinyDiT(), None),
    "cross_bias": (lambda: TinyDiT(token_bias=True), None),
    "mmdit": (lambda: TinyMMDiT(), SPPlan(streams={"img": 1, "txt": 1})),
    "video_rope": (lambda: TinyDiT(depth=3, rope=True), None),
    "video_rope_3heads": (lambda: TinyDiT(depth=2, rope=True, heads=3), None),
    "mmdit_6heads": (lambda: TinyMMDiT(heads=6), SPPlan(streams={"img": 1, "txt": 1})),
}


def sp_matches_single_rank(
    name: str, sp_size: int, checkpoint: str, fsdp: bool, ulysses: int | None = None
) -> dict:
    """SP (x DP) run of MODELS[name] vs the single-process full batch; world-averaged gradients.

    ``ulysses``: Ulysses x Ring with this Ulysses degree (a ``(dp, ring, ulysses)`` mesh); None: Ulysses only.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    dp_size = world // sp_size
    mesh = init_device_mesh("cpu", (dp_size, sp_size), mesh_dim_names=("dp", "sp"))
    splits = None
    if ulysses is not None:
        usp = init_device_mesh(
            "cpu", (dp_size, sp_size // ulysses, ulysses), mesh_dim_names=("dp", "ring", "ulysses")
        )
        splits = {ulysses: (usp.get_group("ulysses"), usp.get_group("ring"))}
    dp_rank = mesh.get_local_rank("dp")
    build, plan = MODELS[name]
    torch.manual_seed(0)
    reference = build()
    model = copy.deepcopy(reference)
    per_dp = 2
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(dp_size * per_dp, 3, IMAGE, IMAGE, generator=gen)
    t = torch.rand(dp_size * per_dp, generator=gen)
    text = torch.randn(dp_size * per_dp, TEXT_LEN, TEXT_DIM, generator=gen)
    target = torch.randn_like(x)

    expected = reference(x, t, text)
    F.mse_loss(expected, target).backward()

    blocks = list(model.blocks if hasattr(model, "blocks") else model.layers)
    kinds = tuple({type(b) for b in blocks})
    if checkpoint == "before":
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, kinds))
        blocks = list(model.blocks if hasattr(model, "blocks") else model.layers)
    sequence_parallel(model, mesh.get_group("sp"), plan, blocks=blocks, splits=splits)
    if checkpoint == "after":
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, kinds))
    if checkpoint == "compile":  # dynamo traces the blocks, hooks and routing mode included (no codegen)
        for block in blocks:
            block.compile(backend="eager")
    if fsdp:
        world_mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks if hasattr(model, "blocks") else model.layers:
            fully_shard(block, mesh=world_mesh)
        fully_shard(model, mesh=world_mesh)
    mine = slice(dp_rank * per_dp, (dp_rank + 1) * per_dp)
    out = model(x[mine], t[mine], text[mine])
    F.mse_loss(out, target[mine]).backward()

    ref_grads = dict(reference.named_parameters())
    grad_err, names = 0.0, []
    for pname, param in model.named_parameters():
        pname = pname.replace("_checkpoint_wrapped_module.", "")
        names.append(pname)
        ref = ref_grads[pname].grad
        if ref is None:  # the last joint block's text outputs feed nothing
            grad_err = max(grad_err, float(param.grad is not None))
            continue
        if fsdp:
            grad = param.grad.full_tensor()  # FSDP2 already averaged over the world
        else:
            grad = param.grad.clone()
            dist.all_reduce(grad)
            grad /= world
        grad_err = max(grad_err, (grad - ref).abs().max().item())
    return {
        "out_err": (out - expected[mine]).abs().max().item(),
        "grad_err": grad_err,
        "params": sorted(names) == sorted(ref_grads),
        "rank": rank,
    }


@pytest.mark.parametrize(
    "name, world_size, sp_size, checkpoint, fsdp, ulysses",
    [
        ("cross", 2, 2, "none", False, None),
        ("cross", 2, 2, "before", False, None),
        ("cross_bias", 4, 4, "after", False, None),
        ("cross_bias", 4, 2, "after", True, None),  # the facade's order: SP -> checkpointing -> FSDP2
        ("mmdit", 2, 2, "after", False, None),
        ("video_rope", 2, 2, "compile", False, None),
        ("mmdit", 4, 4, "none", False, None),
        ("mmdit", 4, 2, "after", True, None),
        ("video_rope", 2, 2, "none", False, None),
        ("video_rope", 4, 4, "after", False, None),
        ("video_rope_3heads", 2, 2, "after", False, 1),  # ring only
        ("mmdit_6heads", 4, 4, "none", True, 2),  # Ulysses 2 x Ring 2, FSDP2
    ],
)
def test_sp_equals_single_rank(dist_pool, name, world_size, sp_size, checkpoint, fsdp, ulysses):
    per_rank = dist_pool.run(
        sp_matches_single_rank, name, sp_size, checkpoint, fsdp, ulysses, world_size=world_size
    )
    for result in per_rank:
        assert result["params"], result
        assert result["out_err"] <= 1e-5, result
        assert result["grad_err"] <= 1e-5, result


class LinearAttention(nn.Module):
    """Token mixing without F.scaled_dot_product_attention (as in Sana): SP cannot split it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x, cond, text, bias=None, rope=None):
        q, k, v = self.qkv(x).relu().chunk(3, dim=-1)
        return x + q @ (k.transpose(1, 2) @ v) / x.shape[1]


class Registers(nn.Module):
    """Attention whose queries are learned registers, not the block's tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.registers = nn.Parameter(torch.randn(1, 3, DIM))

    def forward(self, x, cond, text, bias=None, rope=None):
        q = self.registers.expand(x.shape[0], -1, -1).view(x.shape[0], 3, HEADS, -1).transpose(1, 2)
        k = x.view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)
        return x + F.scaled_dot_product_attention(q, k, k).transpose(1, 2).flatten(2).mean(1, keepdim=True)


def model_with(block: nn.Module) -> TinyDiT:
    model = TinyDiT(depth=1)
    model.blocks[0] = block
    return model


def bad_plans_raise() -> list[tuple[str, str]]:
    group = dist.group.WORLD
    inputs = (torch.randn(1, 3, IMAGE, IMAGE), torch.rand(1), torch.randn(1, TEXT_LEN, TEXT_DIM))
    three_heads = TinyDiT()
    for block in three_heads.blocks:
        block.attn.heads = 3  # 24 channels as 3 heads of 8: not divisible by 2 ranks

    def sp(model: nn.Module, plan: object = None, blocks: object = None) -> nn.Module:
        return sequence_parallel(model, group, plan, blocks=model.blocks if blocks is None else blocks)

    cases = {
        "blocks_type": lambda: sp(TinyDiT(), blocks=TinyDiT().head),
        "blocks_foreign": lambda: sp(TinyDiT(), blocks=TinyDiT().blocks),
        "plan_type": lambda: sp(TinyDiT(), {"streams": {0: 1}}),
        "streams_type": lambda: sp(TinyDiT(), SPPlan(streams=("x",))),
        "twice": lambda: sp(sp(TinyDiT())),
        "linear_attention": lambda: sp(model_with(LinearAttention()))(*inputs),
        "registers": lambda: sp(model_with(Registers()))(*inputs),
        "heads": lambda: sp(three_heads)(*inputs),
        "split_len": lambda: sp(TinyDiT(token_bias=True), SPPlan(split={"text": 1}))(*inputs),
        "no_stream": lambda: sp(TinyDiT(), SPPlan(streams={"tokens": 1}))(*inputs),
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
        "blocks_type": "allowed: a list of the model's blocks",
        "blocks_foreign": "not in the model",
        "plan_type": "SPPlan",
        "streams_type": "SPPlan.streams=('x',)",
        "twice": "already sequence-parallel",
        "linear_attention": "block 'blocks.0' (LinearAttention): no attention over the stream 'x'",
        "registers": "an attention query has 3 tokens",
        "heads": "attention of 3 heads (3 for k/v): the Ulysses degree",
        "split_len": "SPPlan.split['text'] got shape (1, 5, 24)",
        "no_stream": "got none of its token streams ['tokens']",
    }
    per_rank = dist_pool.run(bad_plans_raise, world_size=2)
    assert per_rank[0] == per_rank[1]
    for name, message in per_rank[0]:
        assert expected[name] in message, (name, message)
