"""A small text-conditioned DiT (PixArt-style) for images and videos, and its rectified-flow objective.

Latents (b, c, h, w) or (b, c, t, h, w) are cut into p x p patches per frame, giving t*(h/p)*(w/p)
tokens with fixed sin-cos positions (2-D in space plus 1-D in time). The timestep conditions every block
through adaLN-single: one shared MLP makes a (b, 6*dim) vector, each block adds its own learned table.
Text tokens enter through cross-attention.

Sequence-parallel friendly: a block mixes tokens only inside `F.scaled_dot_product_attention`
(`block.attn`: self-attention, `block.cross_attn`: cross-attention to the replicated text tokens);
everything else in a block acts on each token alone, so the token sequence may be split across ranks.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t (b,) in [0, 1] (scaled to 0..1000): (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of positions (n,): (n, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    args = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1).float()


def sincos_pos_embed(dim: int, frames: int, height: int, width: int) -> torch.Tensor:
    """Positions of a (frames, height, width) token grid, flattened in that order: (frames*height*width, dim).

    Half the channels encode the row, half the column; with frames > 1 a 1-D embedding of the frame
    index is added on top.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for 2-D sin-cos positions, got {dim}")
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.cat([sincos_1d(dim // 2, h.flatten()), sincos_1d(dim // 2, w.flatten())], dim=1)
    if frames > 1:
        pos = pos + sincos_1d(dim, t.flatten())
    return pos


class Attention(nn.Module):
    """Multi-head attention of x (b, s, dim) over itself, or over a context (b, l, context_dim)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim or dim, dim)
        self.to_v = nn.Linear(context_dim or dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (b, s, dim); context: (b, l, context_dim) or None; mask: (b, 1, 1, l) bool, True = attend."""
        context = x if context is None else context
        b, s, _ = x.shape
        q = self.to_q(x).view(b, s, self.heads, -1).transpose(1, 2)  # (b, heads, s, head_dim)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, s, -1))  # heads * head_dim: local under TP


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Modulated self-attention, cross-attention to text, modulated MLP (PixArt-alpha block)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (b, s, dim) tokens; c: (b, 6*dim) shared timestep modulation; text: (b, l, dim);
        text_mask: (b, 1, 1, l) bool, True = real token. Returns (b, s, dim)."""
        modulation = self.scale_shift_table[None] + c.view(c.shape[0], 6, -1)  # (b, 6, dim)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
        x = x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x


class DiT(nn.Module):
    """Text-to-image (num_frames=1) or text-to-video DiT predicting the rectified-flow velocity.

    forward(x, t, text, text_mask): x (b, c, h, w) or (b, c, t, h, w) latents, t (b,) in [0, 1],
    text (b, l, text_dim) token embeddings, text_mask (b, l) bool. Returns the velocity, shaped like x.
    """

    def __init__(
        self,
        in_channels: int = 4,
        input_size: int = 8,
        num_frames: int = 1,
        patch_size: int = 2,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        text_dim: int = 384,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.in_channels, self.input_size, self.num_frames = in_channels, input_size, num_frames
        self.patch_size = patch_size
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(dim, num_frames, grid, grid), persistent=False)

        self.patch_embed = nn.Linear(in_channels * patch_size**2, dim)
        self.t_embedder = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.text_proj = nn.Sequential(
            nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, patch_size**2 * in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for linear in (self.t_embedder[0], self.t_embedder[2], self.text_proj[0], self.text_proj[2]):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.t_block[1].weight)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.to_out.weight)
        nn.init.zeros_(self.proj_out.weight)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, t, h, w) -> (b, t*(h/p)*(w/p), c*p*p)."""
        b, c, t, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, t * (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        """(b, t*(h/p)*(w/p), c*p*p) -> (b, c, t, h, w)."""
        b, p, c = x.shape[0], self.patch_size, self.in_channels
        x = x.reshape(b, t, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, t, h, w)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        image = x.dim() == 4
        if image:
            x = x.unsqueeze(2)
        expected = (self.in_channels, self.num_frames, self.input_size, self.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"latents of shape {tuple(x.shape)} do not match the model's (b, c, t, h, w)={expected}"
            )
        frames, height, width = x.shape[2:]

        tokens = self.patch_embed(self.patchify(x)) + self.pos_embed  # (b, n, dim)
        t_emb = self.t_embedder(timestep_embedding(t, 256))  # (b, dim)
        c = self.t_block(t_emb)  # (b, 6*dim)
        text = self.text_proj(text)  # (b, l, dim)
        mask = None if text_mask is None else text_mask[:, None, None, :].bool()  # (b, 1, 1, l)
        for block in self.blocks:
            tokens = block(tokens, c, text, mask)

        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)  # (b, 1, dim) each
        tokens = self.proj_out(self.norm_out(tokens) * (1 + scale) + shift)
        out = self.unpatchify(tokens, frames, height, width)
        return out.squeeze(2) if image else out


def rectified_flow_loss(
    model: nn.Module, latents: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Rectified-flow loss: x_t = (1 - t) x0 + t noise, the model predicts noise - x0.

    t is logit-normal (SD3); `model` is any callable (x_t, t, text, text_mask) -> velocity. latents: (b, c, [t,] h, w); text: (b, l, text_dim); text_mask: (b, l).
    """
    b = latents.shape[0]
    noise = torch.randn_like(latents)
    t = torch.sigmoid(torch.randn(b, device=latents.device))
    t_ = t.view(b, *([1] * (latents.dim() - 1)))
    x_t = (1 - t_) * latents + t_ * noise
    return F.mse_loss(model(x_t, t, text, text_mask).float(), noise - latents)  # float: a bf16 / fp16 model's


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    null_text: torch.Tensor,
    null_mask: torch.Tensor,
    steps: int = 25,
    guidance: float = 4.0,
) -> torch.Tensor:
    """Euler integration from t=1 (noise) to t=0 with classifier-free guidance.

    noise: (b, c, [t,] h, w); text, null_text: (b, l, text_dim) conditional and empty-prompt
    embeddings; masks (b, l). Returns latents shaped like noise.
    """
    x = noise
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    text_both, mask_both = torch.cat([text, null_text]), torch.cat([text_mask, null_mask])
    for i in range(steps):
        t = times[i].expand(2 * x.shape[0])
        v_cond, v_uncond = model(torch.cat([x, x]), t, text_both, mask_both).chunk(2)
        x = x + (times[i + 1] - times[i]) * (v_uncond + guidance * (v_cond - v_uncond))
    return x
