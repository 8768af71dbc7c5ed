"""Train the demo's tiny AutoencoderKL on the sklearn digits and ship it in tools/assets/.

    uv run python tools/train_vae.py                  # a few minutes on 2 CPU cores
    uv run python tools/train_vae.py --preview /tmp/vae.png

Images are 32x32 in [-1, 1], one channel; latents are 4 x 8 x 8. Half of every batch are full-frame
digits, half are half-size digits at a random horizontal position (the frames of the video mode).
The saved config carries `scaling_factor` / `shift_factor`, which normalise the latents to zero mean,
unit variance. The trainer imports `load_vae`, `vae_encode` and `vae_decode` from here.
"""

import argparse
import json
from pathlib import Path

import torch
from data import load_digit_images
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm import tqdm

ASSETS = Path(__file__).resolve().parent / "assets"
VAE_CONFIG = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 32,
    "mid_block_add_attention": False,
}


def load_vae(name: str = "vae_digits") -> AutoencoderKL:
    """The frozen demo VAE from tools/assets/<name>.json and .safetensors (eval, no grads)."""
    config = json.loads((ASSETS / f"{name}.json").read_text())
    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(load_file(ASSETS / f"{name}.safetensors"))
    return vae.eval().requires_grad_(False)


def vae_encode(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Normalised latents (posterior mean; Stable Diffusion's VAEs have no shift) of images (b, 1, H, W) or videos (b, 1, T, H, W), frame by frame:
    (b, 4, H/4, W/4) or (b, 4, T, H/4, W/4)."""
    if x.dim() == 5:
        b, c, t, h, w = x.shape
        z = vae_encode(vae, x.transpose(1, 2).reshape(b * t, c, h, w))
        return z.reshape(b, t, *z.shape[1:]).transpose(1, 2)
    z = vae.encode(x).latent_dist.mode()
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def vae_decode(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Inverse of `vae_encode`: latents (b, 4, [T,] h, w) -> images in [-1, 1], (b, 1, [T,] 4h, 4w)."""
    if z.dim() == 5:
        b, c, t, h, w = z.shape
        x = vae_decode(vae, z.transpose(1, 2).reshape(b * t, c, h, w))
        return x.reshape(b, t, *x.shape[1:]).transpose(1, 2)
    z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return vae.decode(z).sample.clamp(-1, 1)


def random_batch(
    full: torch.Tensor, half: torch.Tensor, batch_size: int, gen: torch.Generator
) -> torch.Tensor:
    """Half full-frame digits, half half-size digits at a random x offset: (batch_size, 1, 32, 32)."""
    n_half = batch_size // 2
    batch = full[torch.randint(len(full), (batch_size - n_half,), generator=gen)]
    small = half[torch.randint(len(half), (n_half,), generator=gen)]
    size, s = full.shape[-1], half.shape[-1]
    canvas = torch.full((n_half, 1, size, size), -1.0)
    top = (size - s) // 2
    for i, left in enumerate(torch.randint(size - s + 1, (n_half,), generator=gen).tolist()):
        canvas[i, :, top : top + s, left : left + s] = small[i]
    return torch.cat([batch, canvas])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="per latent element, vs. per-pixel MSE")
    parser.add_argument("--threads", type=int, default=1, help="more only on an idle machine")
    parser.add_argument("--name", default="vae_digits", help="writes tools/assets/<name>.{json,safetensors}")
    parser.add_argument("--preview", type=Path, help="save originals over reconstructions as a PNG")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    full, _ = load_digit_images(32)
    half, _ = load_digit_images(16)

    vae = AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    bar = tqdm(range(args.steps), desc="vae")
    for _ in bar:
        x = random_batch(full, half, args.batch_size, gen)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = (reconstruction - x).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}")

    vae.eval()
    with torch.no_grad():
        images = torch.cat([full, random_batch(full, half, len(full), gen)[len(full) // 2 :]])
        z = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in images.split(256)])
        config = {**VAE_CONFIG, "shift_factor": z.mean().item(), "scaling_factor": 1.0 / z.std().item()}
        vae.register_to_config(shift_factor=config["shift_factor"], scaling_factor=config["scaling_factor"])
        reconstruction = torch.cat([vae_decode(vae, vae_encode(vae, chunk)) for chunk in images.split(256)])
    mse = (reconstruction - images).pow(2).mean().item()
    print(f"reconstruction mse={mse:.5f} psnr={10 * torch.log10(torch.tensor(4.0 / mse)).item():.1f} dB")
    print(
        f"latents mean={config['shift_factor']:.3f} std={1 / config['scaling_factor']:.3f} shape={tuple(z.shape[1:])}"
    )

    ASSETS.mkdir(exist_ok=True)
    (ASSETS / f"{args.name}.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, ASSETS / f"{args.name}.safetensors")
    print(f"saved {ASSETS / args.name}.json and .safetensors")

    if args.preview:
        from PIL import Image

        picks = torch.cat([images[:8], images[-8:]])
        recon = torch.cat([reconstruction[:8], reconstruction[-8:]])
        rows = torch.cat([torch.cat(list(picks[:, 0]), dim=1), torch.cat(list(recon[:, 0]), dim=1)])
        pixels = ((rows + 1) * 127.5).clamp(0, 255).byte().numpy()
        Image.fromarray(pixels).resize((pixels.shape[1] * 4, pixels.shape[0] * 4), Image.NEAREST).save(
            args.preview
        )


if __name__ == "__main__":
    main()
