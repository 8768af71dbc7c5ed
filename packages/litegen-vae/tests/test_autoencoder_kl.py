"""A real diffusers AutoencoderKL (tiny config, random weights, no download) through the wrappers."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from litegen_vae import data_parallel, sliced

diffusers = pytest.importorskip("diffusers")


def tiny_vae():
    torch.manual_seed(0)  # the same weights on every rank
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_sliced_mode_and_the_raw_encode_output_with_sampling_outside():
    vae = tiny_vae()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        mode = sliced(lambda x: vae.encode(x).latent_dist.mode(), 2)(x)
        out, ref = (
            sliced(vae.encode, 2)(x),
            vae.encode(x),
        )  # AutoencoderKLOutput(latent_dist=DiagonalGaussian...)
    assert close(mode, ref.latent_dist.mode())
    assert type(out) is type(ref) and type(out.latent_dist) is type(ref.latent_dist)
    for name in ("parameters", "mean", "logvar", "std"):
        assert close(getattr(out.latent_dist, name), getattr(ref.latent_dist, name)), name
    sample = out.latent_dist.sample(torch.Generator().manual_seed(3))  # random sampling stays outside
    assert close(sample, ref.latent_dist.sample(torch.Generator().manual_seed(3)))


def encode_on_ranks(world: int) -> list[str]:
    """Images split on the batch (uneven, and fewer items than ranks), a video split on frames."""
    vae, failures = tiny_vae(), []

    def frames_mode(video):  # (b, c, t, h, w) -> latents (b, 4, t, h/2, w/2), each frame on its own
        b, _, t = video.shape[:3]
        latents = vae.encode(video.transpose(1, 2).flatten(0, 1)).latent_dist.mode()
        return latents.unflatten(0, (b, t)).transpose(1, 2)

    torch.manual_seed(1)
    with torch.no_grad():
        for batch in (world - 1, world + 1):
            x = torch.randn(batch, 3, 16, 16)
            ref = vae.encode(x).latent_dist
            if not close(data_parallel(vae.encode)(x).latent_dist.parameters, ref.parameters):
                failures.append(f"encode batch={batch}")
            if not close(data_parallel(sliced(lambda x: vae.encode(x).latent_dist.mode(), 1))(x), ref.mode()):
                failures.append(f"sliced mode batch={batch}")
        video = torch.randn(2, 3, world + 1, 16, 16)
        if not close(data_parallel(frames_mode, dist.group.WORLD, dim=2)(video), frames_mode(video)):
            failures.append("video frames")
    return failures


def test_data_parallel_autoencoder_kl(dist_pool):
    assert dist_pool.run(encode_on_ranks, 2, world_size=2, timeout=120) == [[]] * 2
