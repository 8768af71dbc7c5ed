"""Your own pictures: a folder of images, each with a same-name `.txt` caption (ColoDiffusion's layout).

    my_images/
      cats/0001.jpg   cats/0001.txt      ("a cat asleep on a red sofa")
      0002.png        0002.txt
      ...

The folder is searched recursively for .jpg / .jpeg / .png / .webp. It is scanned once, when the dataset is
built: an image without its caption, or one that PIL cannot open and `verify()`, is left out and counted,
with one warning naming the first few. So the dataset's length is fixed for the whole run and a resumable
loader's positions always name the same files; nothing is skipped mid-epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
NAMED_IN_WARNING = 5


class ImageFolderDataset(Dataset):
    """Items: {"image": (channels, image_size, image_size) in [-1, 1], "prompt": str, "index": int}.

    Each image is resized (its shorter side to `image_size`, bicubic) and center-cropped; `channels` 1 reads
    it as grey, 3 as RGB. `skipped` lists (path, reason) of every file left out; `warn=False` keeps the
    warning quiet (the other ranks of a run that scan the same folder).
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3, warn: bool = True):
        self.root, self.image_size = Path(root), image_size
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}; allowed: 1 (grey) or 3 (RGB)")
        self.mode = "L" if channels == 1 else "RGB"
        if not self.root.is_dir():
            raise ValueError(f"data_dir={str(self.root)!r} is not a folder of images with .txt captions")
        self.files: list[Path] = []
        self.captions: list[str] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            caption, reason = _caption_and_problem(path)
            if reason is None:
                self.files.append(path)
                self.captions.append(caption)
            else:
                self.skipped.append((path, reason))
        if not self.files:
            raise ValueError(
                f"data_dir={str(self.root)!r} holds no usable image ({', '.join(IMAGE_SUFFIXES)} with a "
                f"same-name .txt caption); {len(self.skipped)} skipped"
            )
        if self.skipped and warn:
            named = "; ".join(
                f"{p.relative_to(self.root)} ({why})" for p, why in self.skipped[:NAMED_IN_WARNING]
            )
            more = len(self.skipped) - NAMED_IN_WARNING
            logger.warning(
                "%s: skipped %d of %d images: %s%s",
                self.root,
                len(self.skipped),
                len(self.skipped) + len(self.files),
                named,
                f"; and {more} more" if more > 0 else "",
            )

    def __len__(self) -> int:
        return len(self.files)

    @property
    def prompts(self) -> list[str]:
        """Every distinct caption, in file order."""
        return list(dict.fromkeys(self.captions))

    def __getitem__(self, index: int) -> dict:
        try:
            with Image.open(self.files[index]) as image:
                image = ImageOps.fit(image.convert(self.mode), (self.image_size,) * 2, Image.BICUBIC)
        except OSError as error:  # verify() reads no JPEG / WebP data: one cut short fails only here
            raise OSError(f"{self.files[index]}: {error} (it passed the scan's Image.verify())") from error
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        pixels = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)
        return {"image": pixels, "prompt": self.captions[index], "index": index}


def _caption_and_problem(path: Path) -> tuple[str, str | None]:
    """The caption of image `path`, or why the image is left out."""
    caption = path.with_suffix(".txt")
    if not caption.is_file():
        return "", f"no caption {caption.name}"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for a bad file
        return "", f"unreadable image: {type(error).__name__}"
    try:
        return caption.read_text(encoding="utf-8").strip(), None
    except (OSError, UnicodeDecodeError) as error:
        return "", f"unreadable caption: {type(error).__name__}"
