"""time_parallel: one clip's frames split over gloo groups of 2, 3 and 4 ranks encode exactly like the
single-process ``vae.encode`` of unmodified diffusers video VAEs (tiny configs, random weights); VAEs
it cannot split exactly and bad frame counts are refused.

Each world size runs all its cases in one harness call; every rank compares with the plain encode
computed locally and returns the names of the cases that differ.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from litegen_vae import time_parallel
from torch import nn

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-5  # fp32, max abs error


def tiny_wan():
    """One temporal downsampling (1 + 2k frames -> 1 + k latents); its encode takes 1 + 4k frames."""
    torch.manual_seed(0)  # the same weights on every rank
    return diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True]
    ).eval()


def tiny_hunyuan():
    """Clip-wide GroupNorms and a mid-block attention with a frame-causal mask; 1 + 4k -> 1 + k frames."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanVideo(
        latent_channels=4,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
    ).eval()
    vae.use_framewise_encoding = False
    return vae


def clip(frames: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, frames, 16, 16, generator=torch.Generator().manual_seed(frames + batch))


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return float("inf")
    return (out - ref).abs().max().item() if out.numel() else 0.0


def encode_cases(cases: list[tuple[str, int]]) -> list[str]:
    """``cases``: (vae, frames); also the local spans, return_dict=False and a batch of world + 1 clips."""
    vaes, failures = {"wan": tiny_wan(), "hunyuan": tiny_hunyuan()}, []
    world, rank = dist.get_world_size(), dist.get_rank()
    with torch.no_grad():
        for name, frames in cases:
            vae, x = vaes[name], clip(frames)
            ref = vae.encode(x).latent_dist
            encode = time_parallel(vae)
            out = encode(x).latent_dist
            for field in ("parameters", "mean", "std"):
                if max_error(getattr(out, field), getattr(ref, field)) > TOLERANCE:
                    failures.append(
                        f"{name} {frames} frames: {field} off by {max_error(out.parameters, ref.parameters)}"
                    )
            start, stop = encode.spans(frames)[rank]
            (local,) = time_parallel(vae, gather=False)(x, return_dict=False)
            if max_error(local.mode(), ref.mode()[:, :, start:stop]) > TOLERANCE:
                failures.append(f"{name} {frames} frames: local span {start}:{stop}")
        x = clip(9, batch=world + 1)  # world clips split by batch, the last one in time
        ref = vaes["wan"].encode(x).latent_dist.mode()
        if max_error(time_parallel(vaes["wan"])(x).latent_dist.mode(), ref) > TOLERANCE:
            failures.append(f"wan batch of {world + 1}")
    return failures


def test_two_ranks_wan_and_hunyuan_9_17_33_frames(dist_pool):
    cases = [(name, frames) for name in ("wan", "hunyuan") for frames in (9, 17, 33)]
    assert dist_pool.run(encode_cases, cases, world_size=2, timeout=180) == [[]] * 2


def test_three_ranks_unequal_spans(dist_pool):
    cases = [("wan", 9), ("wan", 33), ("hunyuan", 9), ("hunyuan", 17), ("hunyuan", 33)]
    assert dist_pool.run(encode_cases, cases, world_size=3, timeout=180) == [[]] * 3


def test_four_ranks_with_a_rank_without_frames(dist_pool):
    """Hunyuan, 9 frames: 3 latent frames over 4 ranks, one rank has none but takes part."""
    assert dist_pool.run(encode_cases, [("hunyuan", 9), ("wan", 17)], world_size=4, timeout=180) == [[]] * 4


class CausalConv(nn.Module):
    """Causal in time like HunyuanVideo's (``time_causal_padding`` then ``conv``)."""

    def __init__(self) -> None:
        super().__init__()
        self.time_causal_padding = (1, 1, 1, 1, 2, 0)
        self.conv = nn.Conv3d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.pad(x, self.time_causal_padding, mode="replicate"))


class ClipMeanVAE(nn.Module):
    """A causal conv, then a mean over the clip's frames: structure the hooks cannot see."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(CausalConv())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return h - h.mean(2, keepdim=True)


def refusals() -> list[str]:
    """Errors every rank raises alike: a bad frame count (before any collective), an inexact VAE."""
    messages = []
    for vae, frames in ((tiny_wan(), 11), (ClipMeanVAE(), 6)):
        try:
            time_parallel(vae)(clip(frames))
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_refusals_are_the_same_error_on_every_rank(dist_pool):
    results = dist_pool.run(refusals, world_size=2, timeout=120)
    assert results[0] == results[1] and len(results[0]) == 2
    frames, inexact = results[0]
    assert "a clip of 11 frames; AutoencoderKLWan takes 1 + 4k frames" in frames and "9 or 13" in frames
    assert "ClipMeanVAE does not encode exactly with its frames split over 2 ranks" in inexact


def test_bad_frame_count_without_a_process_group():
    with pytest.raises(
        ValueError, match=r"a clip of 8 frames; AutoencoderKLHunyuanVideo takes 1 \+ 4k frames"
    ):
        time_parallel(tiny_hunyuan())(clip(8))


def test_one_process_is_the_plain_encode():
    vae, x = tiny_wan(), clip(9)
    with torch.no_grad():
        assert torch.equal(time_parallel(vae)(x).latent_dist.mode(), vae.encode(x).latent_dist.mode())


def test_cogvideox_is_refused_with_the_reason():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
    )
    with pytest.raises(ValueError, match="frame batches in sequence"):
        time_parallel(vae)


def test_an_image_vae_is_not_a_video_vae_and_tiles_are_refused():
    torch.manual_seed(0)
    image_vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    with pytest.raises(TypeError, match="AutoencoderKL is not a causal 3-D video VAE"):
        time_parallel(image_vae)
    vae = tiny_hunyuan()
    vae.use_framewise_encoding = True
    with pytest.raises(ValueError, match="use_framewise_encoding is True"):
        time_parallel(vae)
