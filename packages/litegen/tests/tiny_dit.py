"""A tiny DiT for the facade's tests: patch tokens, adaLN, self- and cross-attention, MLP, head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DIM, HEADS, TOKENS, TEXT, BLOCKS = 16, 4, 9, 5, 3


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        # no key bias: its gradient is exactly zero (softmax ignores a per-row shift), and Adam would turn
        # the float noise in that zero into full-size updates that no two reduction orders share
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (b, s, dim), context: (b, s_kv, dim) -> (b, s, dim)."""
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k = self.k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, s, -1))  # -1: heads * head_dim, local under TP


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, elementwise_affine=False) for _ in range(3))
        self.attn, self.cross_attn = Attention(dim, heads), Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ada = nn.Linear(dim, 4 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x: (b, s, dim) tokens, c: (b, dim) conditioning, text: (b, t, dim)."""
        shift, scale, gate1, gate2 = self.ada(c).unsqueeze(1).chunk(4, dim=-1)
        h = self.norm1(x) * (1 + scale) + shift
        x = x + gate1 * self.attn(h, h)
        x = x + self.cross_attn(self.norm2(x), text)
        return x + gate2 * self.mlp(self.norm3(x))


class TinyDiT(nn.Module):
    def __init__(self, dim: int = DIM, heads: int = HEADS, blocks: int = BLOCKS) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.pos = nn.Parameter(torch.randn(1, TOKENS, dim) * 0.1)
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_proj = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(blocks))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x: (b, TOKENS, 4), t: (b,), text: (b, TEXT, 8) -> (b, TOKENS, 4)."""
        h = self.embed(x) + self.pos
        c = self.time(t[:, None])
        ctx = self.text_proj(text)
        for block in self.blocks:
            h = block(h, c, ctx)
        return self.head(h)


def make_model_and_optimizer(seed: int = 0) -> tuple[TinyDiT, torch.optim.Optimizer]:
    """The model (seeded) and an AdamW with a decay group and a no-decay group (biases, pos)."""
    torch.manual_seed(seed)
    model = TinyDiT()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 2e-3}],
        lr=1e-3,
    )
    return model, opt


def make_batch(global_batch: int, seed: int = 123) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(global_batch, TOKENS, 4, generator=g),
        "t": torch.rand(global_batch, generator=g),
        "text": torch.randn(global_batch, TEXT, 8, generator=g),
        "target": torch.randn(global_batch, TOKENS, 4, generator=g),
    }


def train_steps(
    model, opt, batches: list[dict[str, torch.Tensor]], grad_norm=None
) -> tuple[list[float], list[float]]:
    """Losses and global gradient norms of each step. Adam ignores a gradient's scale, so the norms are
    what catches a wrong averaging factor. ``grad_norm(model)``: the (distributed) global norm."""
    losses, norms = [], []
    for b in batches:
        loss = F.mse_loss(model(b["x"], b["t"], b["text"]), b["target"])
        loss.backward()
        norms.append(float(grad_norm(model)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms


def reference(
    steps: int, global_batch: int, seed: int = 0
) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Single-process, full-batch training: the truth every strategy must match."""
    model, opt = make_model_and_optimizer(seed)
    batches = [make_batch(global_batch, seed=100 + s) for s in range(steps)]
    losses, norms = train_steps(
        model, opt, batches, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9)
    )
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_trains_like_one_process(per_rank: list[dict], key: object, truth: tuple) -> None:
    """Each rank's ``{key: {"losses", "norms", "state"}}`` (or a traceback) against one process's
    ``(losses, norms, state)``: losses averaged over ranks, every rank's global norms, rank 0's weights."""
    for rank, res in enumerate(per_rank):
        assert isinstance(res[key], dict), f"rank {rank} failed:\n{res[key]}"
    ref_losses, ref_norms, ref_state = truth
    losses = torch.tensor([res[key]["losses"] for res in per_rank]).mean(0)  # mean over ranks = global mean
    torch.testing.assert_close(losses, torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for res in per_rank:  # the global gradient norm, identical on every rank
        torch.testing.assert_close(
            torch.tensor(res[key]["norms"]), torch.tensor(ref_norms), rtol=1e-5, atol=1e-7
        )
    state = per_rank[0][key]["state"]
    assert set(state) == set(ref_state)
    for name, ref in ref_state.items():
        torch.testing.assert_close(state[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
