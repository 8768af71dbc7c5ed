"""initialize(encode) at SP 2: ``vae.encode`` of a causal video VAE goes time-parallel; a callable it cannot
inspect never has a clip's frames split unless ``vae.per_frame``; a per-frame 2-D VAE keeps the frame split.
Every path equals the plain encode and says in the log which path it took."""

from __future__ import annotations

import logging

import pytest
import torch
from litegen import LiteGen

diffusers = pytest.importorskip("diffusers")


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def initialized(encode, **vae_config):
    """``initialize(encode)`` at SP 2; the wrapped encode and the facade's log line for it."""
    messages = Messages()
    logging.getLogger("litegen").addHandler(messages)
    try:
        gen = LiteGen({"sp_size": 2, "vae": vae_config})
        wrapped = gen.initialize(encode)
    finally:
        logging.getLogger("litegen").removeHandler(messages)
    gen.close()
    return wrapped, next((line for line in messages.lines if "encode callable" in line), "")


def causal_over_frames(video: torch.Tensor) -> torch.Tensor:
    """A stand-in for an opaque video encoder: each frame depends on the frames before it."""
    return video.cumsum(2)


def encode_paths() -> dict[str, tuple[bool, str]]:
    torch.manual_seed(0)
    wan = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True]
    ).eval()
    torch.manual_seed(0)
    image_vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).eval()

    def frames_mode(video):  # a 2-D VAE over the frames of (b, c, t, h, w)
        b, _, t = video.shape[:3]
        latents = image_vae.encode(video.transpose(1, 2).flatten(0, 1)).latent_dist.mode()
        return latents.unflatten(0, (b, t)).transpose(1, 2)

    video = torch.randn(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(1))
    results = {}
    with torch.no_grad():
        encode, line = initialized(wan.encode)
        results["wan"] = (
            torch.allclose(encode(video).latent_dist.mode(), wan.encode(video).latent_dist.mode(), atol=1e-5),
            line,
        )
        encode, line = initialized(causal_over_frames)
        results["lambda"] = (torch.equal(encode(video), causal_over_frames(video)), line)
        encode, line = initialized(frames_mode, per_frame=True)
        results["per_frame"] = (torch.allclose(encode(video), frames_mode(video), atol=1e-5), line)
    return results


def test_each_encode_path_is_exact_and_logged(dist_pool):
    ranks = dist_pool.run(encode_paths, world_size=2, timeout=180)
    for rank in ranks:
        assert all(exact for exact, _ in rank.values()), rank
    logged = {name: line for name, (_, line) in ranks[0].items()}  # rank 0 logs
    assert "AutoencoderKLWan.encode time-parallel over the 2 SP ranks" in logged["wan"]
    assert "batch split over the 2 SP ranks (frames never" in logged["lambda"]
    assert "frames of 5-D clips (vae.per_frame)" in logged["per_frame"]
