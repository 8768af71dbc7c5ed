"""Text-to-image (and text-to-video) latent diffusion, a DiT or a Stable-Diffusion UNet, trained with LiteGen.

    uv run torchrun --nproc-per-node 2 tools/train.py --config tools/configs/default.yaml
    uv run python tools/train.py --config tools/configs/default.yaml      # one process
    uv run torchrun --nproc-per-node 2 tools/train.py --config tools/configs/unet_ddp.yaml litegen.precision=bf16

The config has two sections: `litegen:` (LiteGen's own keys; the strategy) and `train:` (this script's);
`key=value` overrides a `train:` key, `litegen.key=value` a `litegen:` one (nested: `litegen.ema.decay=0.99`).
LiteGen enters in two places, `LiteGen(config)` and `gen.initialize(...)`; each step goes through
`gen.autocast()`, `gen.backward()`, `gen.clip_grad_norm_()` and `gen.step()` (mixed precision, loss scaling).
Data: the sklearn digits, or `data_dir`, a folder of images with same-name `.txt` captions (folder_data.py);
the VAE and text encoder: the demo's, or local diffusers / transformers folders (`vae_path`, `text_encoder_path`).
Outputs in `train.out_dir`: loss.csv and loss.png (`--report-to csv`, the default) and / or TensorBoard events
(`--report-to tensorboard`), samples_step<N>.png every `sample_every` steps, samples.pt and samples.png (video:
samples_strip.png and samples.gif), checkpoints in `checkpoints/`. On the digits the last line printed is
`RESULT prompt_accuracy=...`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import DIGIT_NAMES, DigitsDataset, image_prompt, video_prompt  # noqa: E402
from dit import DiT, rectified_flow_loss, sample  # noqa: E402
from folder_data import ImageFolderDataset  # noqa: E402
from litegen import LiteGen, load_config  # noqa: E402
from report import Report, image_grid, peak_memory_mib, report_targets, save_png  # noqa: E402
from text_encoder import PromptCache, encode_prompts, load_text_encoder  # noqa: E402
from train_vae import ASSETS, load_vae, vae_decode, vae_encode  # noqa: E402


@dataclass
class TrainConfig:
    """The trainer's own settings (the `train:` section)."""

    out_dir: str = "runs/default"
    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 100  # linear learning-rate warm-up, then constant
    mode: str = "image"  # image | video (DiT only)
    model: str = "dit"  # dit (tools/dit.py) | unet (diffusers UNet2DConditionModel)
    image_size: int = 32  # pixels: the digits' size, or a folder's images resized and center-cropped to it
    num_frames: int = 8  # video mode
    dim: int = 128  # DiT
    depth: int = 4
    heads: int = 4
    patch_size: int = 2
    unet_channels: tuple[int, ...] = (32, 64)  # UNet: block_out_channels, one resolution level each
    unet_cross_attention: tuple[bool, ...] = (False, True)  # which levels attend (the middle always does)
    unet_layers: int = 1  # UNet: layers_per_block
    unet_heads: int = 4  # UNet: attention heads (diffusers calls it attention_head_dim)
    text_drop: float = 0.1  # classifier-free guidance: fraction of captions replaced by the empty prompt
    grad_clip: float = 1.0
    log_every: int = 25
    sample_every: int = 0  # a grid of the sample prompts (EMA weights) every this many steps; 0: never
    sample_prompts: tuple[str, ...] | None = None  # default: the 10 digits, or a folder's first 10 captions
    samples_per_digit: int = 4  # the final samples: this many per sample prompt
    sample_steps: int = 25
    guidance: float = 4.0
    seed: int = 1234  # sampling noise
    data_dir: str | None = None  # a folder of images with same-name .txt captions; null: the sklearn digits
    vae: str = "vae_digits"  # tools/assets/<vae>.json + .safetensors, made by tools/train_vae.py
    vae_path: str | None = None  # a local diffusers AutoencoderKL folder, used instead of `vae`
    text_encoder_path: str | None = None  # a local transformers model folder; null: MiniLM
    tokenizer_path: str | None = None  # its tokenizer's folder; null: text_encoder_path
    max_text_tokens: int = 16  # prompts are padded / truncated to this many tokens


EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # YAML 1.1 reads 2e-3 as a string


def parse_value(text: str) -> Any:
    """An override's value read as YAML, with 2e-3 a number."""
    value = yaml.safe_load(text)
    return float(value) if isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value) else value


def apply_override(litegen: dict, train: dict, item: str) -> None:
    """`key=value` into `train`, `litegen.a.b=value` into `litegen["a"]["b"]`; values are read as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"override {item!r}: expected key=value, e.g. steps=300 or litegen.precision=bf16")
    if not key.startswith("litegen."):
        train[key.removeprefix("train.")] = parse_value(value)
        return
    *parents, leaf = key.removeprefix("litegen.").split(".")
    section = litegen
    for depth, name in enumerate(parents):
        if section.get(name) is None:
            section[name] = {}
        section = section[name]
        if not isinstance(section, dict):
            where = ".".join(["litegen", *parents[: depth + 1]])
            raise SystemExit(f"override {item!r}: {where} is {section!r}, not a section")
    section[leaf] = parse_value(value)


def load(path: str, overrides: list[str]) -> tuple[dict, TrainConfig]:
    """The checked `litegen:` dict and `TrainConfig` of a YAML file with `key=value` / `litegen.key=value`
    overrides; the `litegen:` section (checkpoint_dir defaults to out_dir/checkpoints) is checked by LiteGen's
    own config."""
    if not Path(path).is_file():
        raise SystemExit(f"config: {path!r} is not a file (see tools/configs/)")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - {"litegen", "train"}
    if unknown:
        raise SystemExit(f"config {path}: unknown section(s) {sorted(unknown)}; allowed: litegen, train")
    litegen, train = dict(raw.get("litegen") or {}), dict(raw.get("train") or {})
    for item in overrides:
        apply_override(litegen, train, item)
    names = {f.name for f in fields(TrainConfig)}
    bad = [k for k in train if k not in names]
    if bad:
        raise SystemExit(f"config {path}: unknown train key(s) {bad}; allowed: {sorted(names)}")
    cfg = TrainConfig(**train)
    for key, value, allowed in (
        ("mode", cfg.mode, ("image", "video")),
        ("model", cfg.model, ("dit", "unet")),
    ):
        if value not in allowed:
            raise SystemExit(f"config {path}: train.{key}={value!r}; allowed: {', '.join(allowed)}")
    if cfg.mode == "video" and (cfg.model != "dit" or cfg.data_dir is not None):
        raise SystemExit(f"config {path}: train.mode=video needs model=dit and the digits (data_dir: null)")
    for key in ("data_dir", "vae_path", "text_encoder_path", "tokenizer_path"):
        if getattr(cfg, key) is not None and not Path(getattr(cfg, key)).is_dir():
            raise SystemExit(f"config {path}: train.{key}={getattr(cfg, key)!r} is not a folder")
    for suffix in (".json", ".safetensors") if cfg.vae_path is None else ():
        asset = ASSETS / f"{cfg.vae}{suffix}"
        if not asset.is_file():
            raise SystemExit(f"missing asset {asset}: make it with `uv run python tools/train_vae.py`")
    litegen.setdefault("checkpoint_dir", str(Path(cfg.out_dir) / "checkpoints"))
    try:
        load_config(litegen)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"config {path}: {error}") from None
    return litegen, cfg


def build_unet(cfg: TrainConfig, latent_channels: int, latent_size: int, text_dim: int) -> torch.nn.Module:
    """A small Stable-Diffusion UNet: self- and cross-attention to the text encoder's tokens at the levels
    `unet_cross_attention` names and in the middle block, ResNet blocks everywhere."""
    from diffusers import UNet2DConditionModel

    if len(cfg.unet_cross_attention) != len(cfg.unet_channels):
        raise SystemExit(
            f"config: train.unet_cross_attention={list(cfg.unet_cross_attention)} needs one entry per level of "
            f"train.unet_channels={list(cfg.unet_channels)}"
        )
    attends = list(cfg.unet_cross_attention)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        layers_per_block=cfg.unet_layers,
        cross_attention_dim=text_dim,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=math.gcd(32, *cfg.unet_channels),
    )


def unet_velocity(unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """The UNet called like the DiT: (x, t in [0, 1], text (b, l, d), mask (b, l)) -> velocity shaped like x."""

    def velocity(
        x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return unet(x, t * 1000, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample

    return velocity


@torch.no_grad()
def encode_dataset(
    encode, dataset: DigitsDataset, device: torch.device, channels: int, chunk: int = 256
) -> torch.Tensor:
    """Latents of every item, encoded once (every rank, same chunks: the encode may be a collective)."""
    key = "video" if dataset.num_frames else "image"
    out = []
    for start in range(0, len(dataset), chunk):
        pixels = torch.stack([dataset[i][key] for i in range(start, min(start + chunk, len(dataset)))])
        out.append(encode(pixels.expand(-1, channels, *pixels.shape[2:]).to(device)))  # grey -> the VAE's
    return torch.cat(out)


def draw(
    gen: LiteGen,
    model: torch.nn.Module,
    velocity: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    text: torch.Tensor,
    mask: torch.Tensor,
    null_text: torch.Tensor,
    null_mask: torch.Tensor,
    cfg: TrainConfig,
) -> torch.Tensor:
    """Latents (b, c, [T,] h, w) sampled from `noise` with the EMA weights (the model's without EMA) for text
    (b, l, d) / mask (b, l), guided against the empty prompt's (1, l, d) / (1, l); every rank calls it."""
    model.eval()
    null_text, null_mask = null_text.expand(len(text), -1, -1), null_mask.expand(len(text), -1)
    with gen.ema.swapped(model) if gen.ema is not None else contextlib.nullcontext(), gen.autocast():
        latents = sample(
            velocity, noise, text, mask, null_text, null_mask, steps=cfg.sample_steps, guidance=cfg.guidance
        )
    model.train()
    return latents.float()


def save_outputs(out: Path, cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, rows: int) -> None:
    """samples.pt, a grid with one row per sample prompt (samples.png; video: a frame strip and a GIF) and
    loss.png (when loss.csv was written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    torch.save({"samples": images, "labels": labels}, out / "samples.pt")
    if images.dim() == 4:
        save_png(image_grid(images, rows), out / "samples.png")
    else:  # (10 n, 1, T, H, W): one row per clip of the first sample of each digit, frames left to right
        to_uint8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
        first = images[:: cfg.samples_per_digit, 0]  # (10, T, H, W)
        t, h, w = first.shape[1:]
        save_png(to_uint8(first.permute(0, 2, 1, 3).reshape(1, 10 * h, t * w)), out / "samples_strip.png")
        frames = [
            Image.fromarray(to_uint8(first[:, i].permute(1, 0, 2).reshape(h, 10 * w)).numpy()).resize(
                (10 * w * 3, h * 3), Image.NEAREST
            )
            for i in range(t)
        ]
        frames[0].save(out / "samples.gif", save_all=True, append_images=frames[1:], duration=150, loop=0)
    rows_csv = list(csv.DictReader((out / "loss.csv").open())) if (out / "loss.csv").is_file() else []
    if rows_csv:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([int(r["step"]) for r in rows_csv], [float(r["loss"]) for r in rows_csv])
        ax.set(xlabel="step", ylabel="rectified-flow loss", yscale="log", title="training loss")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)


def main(argv: list[str] | None = None) -> float | None:
    """Train; returns the prompt accuracy on rank 0 for the digits, else None."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "default.yaml"))
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(
        "--report-to", default="csv", help="csv (loss.csv, loss.png), tensorboard, csv,tensorboard or none"
    )
    parser.add_argument("overrides", nargs="*", help="key=value (train:) or litegen.key=value overrides")
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    try:
        targets = report_targets(args.report_to)
    except ValueError as error:
        parser.error(str(error))
    litegen_cfg, cfg = load(args.config, args.overrides)
    out = Path(cfg.out_dir)
    litegen_cfg["auto_resume"] = bool(litegen_cfg.get("auto_resume")) or args.resume
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)

    gen = LiteGen(litegen_cfg)  # seeds every rank alike: the model below starts identical everywhere
    video = cfg.mode == "video"
    text_encoder, tokenize = load_text_encoder(cfg.text_encoder_path, cfg.tokenizer_path, cfg.max_text_tokens)
    if cfg.vae_path is None:
        vae = load_vae(cfg.vae)
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(cfg.vae_path, local_files_only=True).eval().requires_grad_(False)
    vae.to(gen.device)
    channels, latent_channels = vae.config.in_channels, vae.config.latent_channels
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = cfg.image_size // downsample
    if cfg.data_dir is None:
        dataset = DigitsDataset(cfg.image_size, cfg.num_frames if video else 0)
    else:
        dataset = ImageFolderDataset(cfg.data_dir, cfg.image_size, channels, warn=gen.is_main)
    text_dim = text_encoder.config.hidden_size
    if cfg.model == "unet":
        model = build_unet(cfg, latent_channels, latent_size, text_dim)
    else:
        model = DiT(
            in_channels=latent_channels,
            input_size=latent_size,
            num_frames=cfg.num_frames if video else 1,
            patch_size=cfg.patch_size,
            dim=cfg.dim,
            depth=cfg.depth,
            heads=cfg.heads,
            text_dim=text_dim,
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)

    # the UNet's units for sharding and checkpointing: its levels and middle (the default would be each of its
    # ResNet, attention and resampling modules: three times the collectives, each a small tensor)
    blocks = [*model.down_blocks, model.mid_block, *model.up_blocks] if cfg.model == "unet" else None
    model, optimizer, text_encoder, loader, encode = gen.initialize(
        model, optimizer, text_encoder, dataset, lambda x: vae_encode(vae, x), blocks=blocks
    )
    velocity = unet_velocity(model) if cfg.model == "unet" else model

    # the prompts to draw: the 10 digits (video: moving right), or the first 10 captions of a folder
    if cfg.sample_prompts is not None:
        sample_prompts = list(cfg.sample_prompts)
    elif cfg.data_dir is None:
        sample_prompts = [video_prompt(d, "right") if video else image_prompt(d) for d in range(10)]
    else:
        sample_prompts = dataset.prompts[:10]
    if cfg.data_dir is None:  # the digits: every latent and prompt embedding computed once, up front
        prompts = PromptCache(
            text_encoder, tokenize, [*dataset.prompts, *sample_prompts, ""], device=gen.device
        )
        latents_of = encode_dataset(encode, dataset, gen.device, channels)  # (n, c, [T,] h, w)
        batch_latents = lambda batch: latents_of[batch["index"].to(gen.device)]  # noqa: E731
    else:  # a folder: each batch encoded as it comes (the encoders may be collectives: every rank calls them)
        prompts = lambda texts: [x.to(gen.device) for x in encode_prompts(text_encoder, tokenize, texts)]  # noqa: E731
        batch_latents = lambda batch: encode(batch["image"].to(gen.device))  # noqa: E731
    null_text, null_mask = prompts([""])
    sample_text, sample_mask = prompts(sample_prompts)
    latent_shape = (
        (latent_channels, cfg.num_frames, latent_size, latent_size)
        if video
        else (latent_channels, latent_size, latent_size)
    )
    noise_generator = torch.Generator().manual_seed(cfg.seed)
    validation_noise = torch.randn(len(sample_prompts), *latent_shape, generator=noise_generator).to(
        gen.device
    )

    report = Report(out, targets, enabled=gen.is_main, start_step=gen.start_step)
    if gen.is_main:
        n_params = sum(p.numel() for p in model.parameters())  # global sizes, sharded or not
        logging.info(
            "%s %.2fM parameters, %d steps from step %d",
            "UNet" if cfg.model == "unet" else "DiT",
            n_params / 1e6,
            cfg.steps,
            gen.start_step,
        )
    progress = None
    if gen.is_main:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, initial=gen.start_step, desc="train", dynamic_ncols=True)

    batches, start = gen.batches(), time.perf_counter()
    losses, norms, step_times = [], [], []
    for step in range(gen.start_step, cfg.steps):
        step_start = time.perf_counter()
        batch = next(batches)
        latents = batch_latents(batch)
        for group in optimizer.param_groups:  # stateless warm-up: resumes exactly
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        text, mask = prompts(list(batch["prompt"]))
        drop = (
            torch.rand(text.shape[0], device=gen.device) < cfg.text_drop
        )  # same on the ranks of an SP group
        text = torch.where(drop[:, None, None], null_text, text)
        mask = torch.where(drop[:, None], null_mask, mask)
        with gen.autocast():
            loss = rectified_flow_loss(velocity, latents, text, mask)
        gen.backward(loss)
        norm = gen.clip_grad_norm_(cfg.grad_clip)
        if gen.step() and gen.ema is not None:
            gen.ema.update(step)
        losses.append(loss.item())
        if gen.is_main:
            norms.append(float(norm))
            step_times.append(time.perf_counter() - step_start)
            progress.update(1)
        if gen.is_main and (step + 1) % cfg.log_every == 0:
            finite = [n for n in norms if math.isfinite(n)]
            step_time = sum(step_times) / len(step_times)
            values = {
                "loss": sum(losses) / len(losses),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": sum(finite) / len(finite) if finite else math.inf,
                "loss_scale": gen.loss_scale,
                "skipped_steps": gen.skipped_steps,
                "step_time": step_time,
                "samples_per_s": gen.config.global_batch_size / step_time,
                "peak_memory": peak_memory_mib(gen.device),
                "seconds": time.perf_counter() - start,
            }
            progress.set_postfix(loss=f"{values['loss']:.4f}")
            report.scalars(step + 1, values)
        if (step + 1) % cfg.log_every == 0:
            for window in (losses, norms, step_times):
                window.clear()
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            latents = draw(
                gen, model, velocity, validation_noise, sample_text, sample_mask, null_text, null_mask, cfg
            )
            if gen.is_main:  # images: one row; clips: a row of frames each
                images = vae_decode(vae, latents).cpu()
                rows = 1 if images.dim() == 4 else len(images)
                grid = image_grid(images.transpose(1, 2).flatten(0, 1) if images.dim() == 5 else images, rows)
                save_png(grid, out / f"samples_step{step + 1}.png")
                report.image("samples", step + 1, grid)
        every = gen.config.checkpoint_every
        if every and (step + 1) % every == 0 and step + 1 < cfg.steps:
            gen.save(step + 1)
    if progress is not None:
        progress.close()
    gen.save(cfg.steps)

    # the final samples, from the EMA weights: every rank runs the model (it is sharded / sequence-parallel)
    n = cfg.samples_per_digit
    text, mask = sample_text.repeat_interleave(n, 0), sample_mask.repeat_interleave(n, 0)
    noise = torch.randn(len(text), *latent_shape, generator=torch.Generator().manual_seed(cfg.seed))
    latents = draw(gen, model, velocity, noise.to(gen.device), text, mask, null_text, null_mask, cfg)
    gen.close()
    if not gen.is_main:
        return None
    report.close()
    images = vae_decode(vae, latents).cpu()
    digits = cfg.data_dir is None and cfg.sample_prompts is None
    labels = torch.arange(len(sample_prompts)).repeat_interleave(n)  # the digit, or the sample prompt's index
    save_outputs(out, cfg, images, labels, rows=len(sample_prompts))
    if not digits:
        print(f"samples of {len(sample_prompts)} prompts, {n} each, in {out}/samples.png")
        return None
    from eval_digits import fit_classifier, prompt_accuracy

    classifier, held_out = fit_classifier(video=video)
    accuracy = prompt_accuracy(classifier, images.mean(1, keepdim=True), labels)
    print(
        f"classifier held-out accuracy {held_out:.3f}; digits asked for: "
        f"{', '.join(DIGIT_NAMES)}; pictures in {out}/"
    )
    print(f"RESULT prompt_accuracy={accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
