"""Handwritten digits from scikit-learn as a text-to-image / text-to-video dataset.

`load_digits()` ships 1797 grey 8x8 digits (values 0..16) inside scikit-learn, so the demo needs no
download. Images are upsampled (bicubic) and scaled to [-1, 1]; every item carries a prompt in one of
several phrasings, chosen deterministically from its index.
"""

import random

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {name}, written by hand",
    "a handwritten {digit}",
    "the digit {digit}",
    "a scan of a handwritten {name}",
    "{name}",
    "a drawing of the number {digit}",
    "a hand-drawn {name} in white ink on black",
)
VIDEO_TEMPLATES = (
    "a handwritten digit {name} moving to the {direction}",
    "the number {digit} sliding {direction}",
    "a handwritten {name} that moves {direction}",
    "digit {digit} drifting to the {direction}",
)


def image_prompt(label: int, template: int = 0) -> str:
    """The prompt for digit `label`; template 0 is the canonical one used for sampling."""
    return IMAGE_TEMPLATES[template].format(name=DIGIT_NAMES[label], digit=label)


def video_prompt(label: int, direction: str, template: int = 0) -> str:
    """The prompt for a clip of digit `label` moving `direction` ("left" or "right")."""
    return VIDEO_TEMPLATES[template].format(name=DIGIT_NAMES[label], digit=label, direction=direction)


def load_digit_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits upsampled to `size`: images (n, 1, size, size) in [-1, 1], labels (n,) int64."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
    return images.clamp(0.0, 1.0) * 2.0 - 1.0, torch.tensor(digits.target, dtype=torch.int64)


def moving_clip(image: torch.Tensor, num_frames: int, size: int, direction: str) -> torch.Tensor:
    """A clip of `image` (1, s, s) crossing a black (size x size) canvas: (1, num_frames, size, size).

    The digit is vertically centred and moves at constant speed from one edge to the other.
    """
    s = image.shape[-1]
    if s > size:
        raise ValueError(f"digit size {s} must not exceed the frame size {size}")
    top = (size - s) // 2
    lefts = torch.linspace(0, size - s, num_frames).round().long().tolist()
    if direction == "left":
        lefts = lefts[::-1]
    clip = torch.full((1, num_frames, size, size), -1.0)
    for t, left in enumerate(lefts):
        clip[:, t, top : top + s, left : left + s] = image
    return clip


class DigitsDataset(Dataset):
    """sklearn digits with prompts. Items: {"image": (1, H, W) in [-1, 1], "prompt": str, "label": int,
    "index": int}; with `num_frames > 0`, {"video": (1, T, H, W), ...} instead: the digit, at half the
    frame size, moves left or right across the frame and the prompt says which way.

    The default collate function batches these dicts (prompts become a list of str).
    """

    def __init__(self, image_size: int = 32, num_frames: int = 0):
        if image_size % 2:
            raise ValueError(f"image_size must be even, got {image_size}")
        if num_frames < 0:
            raise ValueError(f"num_frames must be >= 0 (0 = images), got {num_frames}")
        self.image_size = image_size
        self.num_frames = num_frames
        digit_size = image_size // 2 if num_frames else image_size
        self.images, self.labels = load_digit_images(digit_size)

    def __len__(self) -> int:
        return len(self.labels)

    def prompt(self, index: int) -> str:
        """The prompt of item `index` (deterministic: the phrasing is seeded by the index)."""
        label = int(self.labels[index])
        rng = random.Random(index)
        if self.num_frames:
            direction = self.direction(index)
            return video_prompt(label, direction, rng.randrange(len(VIDEO_TEMPLATES)))
        return image_prompt(label, rng.randrange(len(IMAGE_TEMPLATES)))

    def direction(self, index: int) -> str:
        """Which way the digit of item `index` moves in video mode."""
        return "right" if index % 2 == 0 else "left"

    @property
    def prompts(self) -> list[str]:
        """Every distinct prompt this dataset can return (plus the canonical ones), sorted."""
        if self.num_frames:
            canonical = [video_prompt(d, way) for d in range(10) for way in ("left", "right")]
        else:
            canonical = [image_prompt(d) for d in range(10)]
        return sorted({self.prompt(i) for i in range(len(self))} | set(canonical))

    def __getitem__(self, index: int) -> dict:
        item = {"prompt": self.prompt(index), "label": int(self.labels[index]), "index": index}
        if self.num_frames:
            item["video"] = moving_clip(
                self.images[index], self.num_frames, self.image_size, self.direction(index)
            )
        else:
            item["image"] = self.images[index]
        return item
