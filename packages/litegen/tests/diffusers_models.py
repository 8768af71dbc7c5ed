"""Tiny configs of real diffusers transformer classes, unmodified, with batches and a training loop.

Token counts are chosen so that neither the text nor the image/video tokens divide by 2 or 4 (the
SP sizes of the tests), except where the class fixes them. AdamW divides each gradient by its own
size, so float noise in a gradient that is (nearly) zero becomes a full-size update that no two
reduction orders share: key biases, whose true gradient is exactly zero (softmax ignores a per-query
shift), are frozen, and ``eps=1e-6`` keeps elements with gradients near 1e-8 (a weight column fed by
a near-zero embedding channel) from being normalized to full steps; typical gradients here are 1e-3.
"""

from __future__ import annotations

from collections.abc import Callable

import diffusers
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from torch import nn

TEXT = 5  # text tokens (CogVideoX: 6, its max_text_seq_length)
Batch = dict[str, torch.Tensor]


def _pixart() -> nn.Module:
    return diffusers.PixArtTransformer2DModel(
        sample_size=10,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=32,
        caption_channels=16,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )


def _pixart_batch(b: int, g: torch.Generator) -> Batch:
    mask = torch.ones(b, TEXT)
    mask[1::2, -2:] = 0  # every other caption is two tokens shorter: a text padding mask
    return {
        "hidden_states": torch.randn(b, 4, 10, 10, generator=g),
        "timestep": torch.rand(b, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(b, TEXT, 16, generator=g),
        "encoder_attention_mask": mask,
    }


def _wan(heads: int = 4) -> nn.Module:
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=32,
    )


def _wan_batch(b: int, g: torch.Generator) -> Batch:  # 3 x 5 x 5 = 75 video tokens
    return {
        "hidden_states": torch.randn(b, 4, 3, 10, 10, generator=g),
        "timestep": torch.rand(b, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(b, TEXT, 16, generator=g),
    }


def _flux(heads: int = 4) -> nn.Module:
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=heads,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )


def _image_ids(height: int, width: int, axes: int) -> torch.Tensor:
    """Flux-style position ids ``(height * width, axes)``: (0, row, col, 0...)."""
    ids = torch.zeros(height, width, axes)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(-1, axes)


def _flux_batch(b: int, g: torch.Generator) -> Batch:  # a 7 x 9 latent: 63 image tokens
    img_ids = _image_ids(7, 9, 3)
    return {
        "hidden_states": torch.randn(b, 63, 4, generator=g),
        "encoder_hidden_states": torch.randn(b, TEXT, 16, generator=g),
        "pooled_projections": torch.randn(b, 16, generator=g),
        "timestep": torch.rand(b, generator=g),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(TEXT, 3),
    }


def _sd3() -> nn.Module:
    return diffusers.SD3Transformer2DModel(
        sample_size=10,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    )


def _sd3_batch(b: int, g: torch.Generator) -> Batch:  # 5 x 5 = 25 image tokens
    return {
        "hidden_states": torch.randn(b, 4, 10, 10, generator=g),
        "encoder_hidden_states": torch.randn(b, TEXT, 16, generator=g),
        "pooled_projections": torch.randn(b, 16, generator=g),
        "timestep": torch.rand(b, generator=g) * 1000,
    }


def _cogvideox() -> nn.Module:
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=16,
        num_layers=2,
        sample_width=10,
        sample_height=10,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=6,
        use_rotary_positional_embeddings=True,
    )


def _cogvideox_batch(b: int, g: torch.Generator) -> Batch:  # 3 frames x 5 x 5 = 75 video tokens, rotary table
    cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (5, 5)), (5, 5), 3)
    return {
        "hidden_states": torch.randn(b, 3, 4, 10, 10, generator=g),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "encoder_hidden_states": torch.randn(b, 6, 16, generator=g),
        "image_rotary_emb": (cos, sin),
    }


def _flux2() -> nn.Module:  # text and image joined between the dual- and the single-stream blocks
    return diffusers.Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=16,
        timestep_guidance_channels=16,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )


def _flux2_batch(b: int, g: torch.Generator) -> Batch:
    return {
        "hidden_states": torch.randn(b, 63, 4, generator=g),
        "encoder_hidden_states": torch.randn(b, TEXT, 16, generator=g),
        "timestep": torch.rand(b, generator=g),
        "img_ids": _image_ids(7, 9, 4),
        "txt_ids": torch.zeros(TEXT, 4),
    }


def _hunyuan_video() -> nn.Module:  # a text refiner (left whole), dual- then single-stream blocks
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=False,
        text_embed_dim=16,
        pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    )


def _hunyuan_video_batch(b: int, g: torch.Generator) -> Batch:  # 3 x 4 x 5 = 60 video tokens, joint key mask
    mask = torch.ones(b, TEXT)
    mask[1::2, -2:] = 0
    return {
        "hidden_states": torch.randn(b, 4, 3, 8, 10, generator=g),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "encoder_hidden_states": torch.randn(b, TEXT, 16, generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(b, 16, generator=g),
    }


def _sana() -> nn.Module:  # linear attention and a convolution over the image grid: SP must refuse it
    return diffusers.SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=4,
        cross_attention_head_dim=8,
        cross_attention_dim=32,
        caption_channels=16,
        mlp_ratio=2.0,
        sample_size=8,
        patch_size=2,
    )


def _sana_batch(b: int, g: torch.Generator) -> Batch:
    return {
        "hidden_states": torch.randn(b, 4, 8, 10, generator=g),
        "encoder_hidden_states": torch.randn(b, TEXT, 16, generator=g),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
    }


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, torch.Generator], Batch]]] = {
    "pixart": (_pixart, _pixart_batch),
    "wan": (_wan, _wan_batch),
    "flux": (_flux, _flux_batch),
    "sd3": (_sd3, _sd3_batch),
    "cogvideox": (_cogvideox, _cogvideox_batch),
    "flux2": (_flux2, _flux2_batch),
    "hunyuan_video": (_hunyuan_video, _hunyuan_video_batch),
}
REFUSED = {"sana": (_sana, _sana_batch)}


def make_model_and_optimizer(
    name: str, seed: int = 0, **config: int
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``config``: constructor overrides some builders take (``heads`` for wan and flux)."""
    torch.manual_seed(seed)
    model = {**MODELS, **REFUSED}[name][0](**config)
    for pname, param in model.named_parameters():
        if pname.endswith(("to_k.bias", "add_k_proj.bias")):
            param.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, eps=1e-6)


def make_batches(name: str, global_batch: int, steps: int) -> list[Batch]:
    """Per step: the model's keyword inputs for the whole global batch and a target like its output."""
    make = {**MODELS, **REFUSED}[name][1]
    return [make(global_batch, torch.Generator().manual_seed(100 + s)) for s in range(steps)]


def rows(batch: Batch, start: int, stop: int, global_batch: int) -> Batch:
    """This data-parallel rank's samples: tensors with the batch as dim 0 are sliced, the rest shared."""
    return {
        k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == global_batch else v
        for k, v in batch.items()
    }


def train_steps(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[Batch], grad_norm
) -> tuple[list, list]:
    """Losses and global gradient norms of each step; the target is a fixed function of the input."""
    losses, norms = [], []
    for batch in batches:
        out = model(**batch).sample
        out = (
            out[:, : batch["hidden_states"].shape[1]]
            if out.shape[1] != batch["hidden_states"].shape[1]
            else out
        )
        target = torch.sin(3 * batch["hidden_states"])
        loss = F.mse_loss(out, target)
        loss.backward()
        norms.append(float(grad_norm(model)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms


def reference(
    name: str, steps: int, global_batch: int, **config: int
) -> tuple[list, list, dict[str, torch.Tensor]]:
    """Single-process, full-batch training: the truth every layout must match."""
    model, opt = make_model_and_optimizer(name, **config)
    losses, norms = train_steps(
        model,
        opt,
        make_batches(name, global_batch, steps),
        lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9),
    )
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}
