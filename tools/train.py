"""Text-to-image (and text-to-video) latent diffusion on handwritten digits, trained with LiteGen.

    uv run torchrun --nproc-per-node 2 tools/train.py --config tools/configs/default.yaml
    uv run python tools/train.py --config tools/configs/default.yaml      # one process

The config has two sections: `litegen:` (LiteGen's own keys; the strategy) and `train:` (this
script's). LiteGen enters in two places: `LiteGen(config)` and `gen.initialize(...)`.
Outputs in `train.out_dir`: loss.csv, loss.png, samples.pt, samples.png (video: samples_strip.png and
samples.gif), checkpoints in `checkpoints/`; the last line printed is `RESULT prompt_accuracy=...`.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import DIGIT_NAMES, DigitsDataset, image_prompt, video_prompt  # noqa: E402
from dit import DiT, rectified_flow_loss, sample  # noqa: E402
from litegen import LiteGen  # noqa: E402
from text_encoder import PromptCache, load_text_encoder  # noqa: E402
from train_vae import ASSETS, load_vae, vae_decode, vae_encode  # noqa: E402


@dataclass
class TrainConfig:
    """The trainer's own settings (the `train:` section)."""

    out_dir: str = "runs/default"
    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 100  # linear learning-rate warm-up, then constant
    mode: str = "image"  # image | video
    image_size: int = 32  # pixels; latents are image_size / 4
    num_frames: int = 8  # video mode
    dim: int = 128
    depth: int = 4
    heads: int = 4
    patch_size: int = 2
    text_drop: float = 0.1  # classifier-free guidance: fraction of captions replaced by the empty prompt
    grad_clip: float = 1.0
    log_every: int = 25
    samples_per_digit: int = 4
    sample_steps: int = 25
    guidance: float = 4.0
    seed: int = 1234  # sampling noise at the end
    vae: str = "vae_digits"  # tools/assets/<vae>.json + .safetensors, made by tools/train_vae.py


def load(path: str, overrides: list[str]) -> tuple[dict, TrainConfig]:
    """The `litegen:` dict and a checked `TrainConfig` from a YAML file; `key=value` overrides for `train:`."""
    if not Path(path).is_file():
        raise SystemExit(f"config: {path!r} is not a file (see tools/configs/)")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - {"litegen", "train"}
    if unknown:
        raise SystemExit(f"config {path}: unknown section(s) {sorted(unknown)}; allowed: litegen, train")
    train = dict(raw.get("train") or {})
    for item in overrides:
        key, _, value = item.partition("=")
        train[key] = yaml.safe_load(value)
    names = {f.name for f in fields(TrainConfig)}
    bad = [k for k in train if k not in names]
    if bad:
        raise SystemExit(f"config {path}: unknown train key(s) {bad}; allowed: {sorted(names)}")
    cfg = TrainConfig(**train)
    if cfg.mode not in ("image", "video"):
        raise SystemExit(f"config {path}: train.mode={cfg.mode!r}; allowed: image, video")
    for suffix in (".json", ".safetensors"):
        asset = ASSETS / f"{cfg.vae}{suffix}"
        if not asset.is_file():
            raise SystemExit(f"missing asset {asset}: make it with `uv run python tools/train_vae.py`")
    return dict(raw.get("litegen") or {}), cfg


@torch.no_grad()
def encode_dataset(encode, dataset: DigitsDataset, device: torch.device, chunk: int = 256) -> torch.Tensor:
    """Latents of every item, encoded once (every rank, same chunks: the encode may be a collective)."""
    key = "video" if dataset.num_frames else "image"
    out = []
    for start in range(0, len(dataset), chunk):
        pixels = torch.stack([dataset[i][key] for i in range(start, min(start + chunk, len(dataset)))])
        out.append(encode(pixels.to(device)))
    return torch.cat(out)


def save_outputs(out: Path, cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor) -> None:
    """samples.pt, a digit-per-row grid (samples.png; video: a frame strip and a GIF) and loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    torch.save({"samples": images, "labels": labels}, out / "samples.pt")
    to_uint8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    n = cfg.samples_per_digit
    if images.dim() == 4:  # (10 n, 1, H, W) -> grid of 10 rows
        h, w = images.shape[-2:]
        grid = images.view(10, n, h, w).permute(0, 2, 1, 3).reshape(10 * h, n * w)
        Image.fromarray(to_uint8(grid).numpy()).resize((n * w * 3, 10 * h * 3), Image.NEAREST).save(
            out / "samples.png"
        )
    else:  # (10 n, 1, T, H, W): one row per clip of the first sample of each digit, frames left to right
        first = images[::n, 0]  # (10, T, H, W)
        t, h, w = first.shape[1:]
        strip = first.permute(0, 2, 1, 3).reshape(10 * h, t * w)
        Image.fromarray(to_uint8(strip).numpy()).resize((t * w * 3, 10 * h * 3), Image.NEAREST).save(
            out / "samples_strip.png"
        )
        frames = [
            Image.fromarray(to_uint8(first[:, i].permute(1, 0, 2).reshape(h, 10 * w)).numpy()).resize(
                (10 * w * 3, h * 3), Image.NEAREST
            )
            for i in range(t)
        ]
        frames[0].save(out / "samples.gif", save_all=True, append_images=frames[1:], duration=150, loop=0)
    rows = list(csv.DictReader((out / "loss.csv").open()))
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
        ax.set(xlabel="step", ylabel="rectified-flow loss", yscale="log", title="training loss")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "default.yaml"))
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="train.<key>=<value> overrides, e.g. steps=200")
    args = parser.parse_args()
    litegen_cfg, cfg = load(args.config, [o.removeprefix("train.") for o in args.overrides])
    out = Path(cfg.out_dir)
    litegen_cfg.setdefault("checkpoint_dir", str(out / "checkpoints"))
    litegen_cfg["auto_resume"] = bool(litegen_cfg.get("auto_resume")) or args.resume
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)

    gen = LiteGen(litegen_cfg)  # seeds every rank alike: the model below starts identical everywhere
    video = cfg.mode == "video"
    dataset = DigitsDataset(cfg.image_size, cfg.num_frames if video else 0)
    text_encoder, tokenize = load_text_encoder()
    vae = load_vae(cfg.vae).to(gen.device)
    model = DiT(
        in_channels=4,
        input_size=cfg.image_size // 4,
        num_frames=cfg.num_frames if video else 1,
        patch_size=cfg.patch_size,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        text_dim=384,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)

    model, optimizer, text_encoder, loader, encode = gen.initialize(
        model, optimizer, text_encoder, dataset, lambda x: vae_encode(vae, x)
    )

    prompts = PromptCache(text_encoder, tokenize, [*dataset.prompts, ""], device=gen.device)
    latents_of = encode_dataset(encode, dataset, gen.device)  # (n, 4, [T,] h, w)
    null_text, null_mask = prompts([""])
    if gen.is_main:
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())  # global sizes, sharded or not
        logging.info("DiT %.2fM parameters, %d steps from step %d", n_params / 1e6, cfg.steps, gen.start_step)
    log = (out / "loss.csv").open("a", newline="") if gen.is_main else None
    if log is not None and gen.start_step == 0:
        log.truncate(0)
        log.write("step,loss,seconds\n")
    progress = None
    if gen.is_main:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, initial=gen.start_step, desc="train", dynamic_ncols=True)

    batches, start, running = gen.batches(), time.perf_counter(), []
    for step in range(gen.start_step, cfg.steps):
        batch = next(batches)
        latents = latents_of[batch["index"].to(gen.device)]
        for group in optimizer.param_groups:  # stateless warm-up: resumes exactly
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        text, mask = prompts(list(batch["prompt"]))
        drop = (
            torch.rand(text.shape[0], device=gen.device) < cfg.text_drop
        )  # same on the ranks of an SP group
        text = torch.where(drop[:, None, None], null_text, text)
        mask = torch.where(drop[:, None], null_mask, mask)
        loss = rectified_flow_loss(model, latents, text, mask)
        loss.backward()
        gen.clip_grad_norm_(cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if gen.ema is not None:
            gen.ema.update(step)
        running.append(loss.item())
        if progress is not None:
            progress.update(1)
            if (step + 1) % cfg.log_every == 0:
                mean = sum(running) / len(running)
                progress.set_postfix(loss=f"{mean:.4f}")
                log.write(f"{step + 1},{mean:.6f},{time.perf_counter() - start:.1f}\n")
                log.flush()
        if (step + 1) % cfg.log_every == 0:
            running.clear()
        every = gen.config.checkpoint_every
        if every and (step + 1) % every == 0 and step + 1 < cfg.steps:
            gen.save(step + 1)
    if progress is not None:
        progress.close()
    gen.save(cfg.steps)

    # samples from the EMA weights: every rank runs the model (it is sharded / sequence-parallel)
    labels = torch.arange(10).repeat_interleave(cfg.samples_per_digit)
    names = [video_prompt(int(d), "right") if video else image_prompt(int(d)) for d in labels]
    text, mask = prompts(names)
    size = cfg.image_size // 4
    shape = (len(labels), 4, cfg.num_frames, size, size) if video else (len(labels), 4, size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed)).to(gen.device)
    null_t, null_m = null_text.expand(len(labels), -1, -1), null_mask.expand(len(labels), -1)
    model.eval()
    with gen.ema.swapped(model) if gen.ema is not None else torch.no_grad():
        latents = sample(
            model, noise, text, mask, null_t, null_m, steps=cfg.sample_steps, guidance=cfg.guidance
        )
    images = vae_decode(vae, latents).cpu()
    gen.close()
    if gen.is_main:
        log.close()
        save_outputs(out, cfg, images, labels)
        from eval_digits import fit_classifier, prompt_accuracy

        classifier, held_out = fit_classifier(video=video)
        accuracy = prompt_accuracy(classifier, images, labels)
        print(
            f"classifier held-out accuracy {held_out:.3f}; digits asked for: "
            f"{', '.join(DIGIT_NAMES)}; pictures in {out}/"
        )
        print(f"RESULT prompt_accuracy={accuracy:.3f}")


if __name__ == "__main__":
    main()
