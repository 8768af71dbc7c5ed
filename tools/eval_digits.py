"""Does each generated sample show the digit its prompt asked for?

    uv run python tools/eval_digits.py runs/default/samples.pt

The file holds `{"samples": (N, 1, H, W) images or (N, 1, T, H, W) videos in [-1, 1], "labels": (N,)}`,
as the trainer writes it. An SVM is fit on the real digits (the same upsampled images the model was
trained on, pooled back to sklearn's 8x8 / 0..16 domain); its held-out accuracy is printed first.
Videos are classified frame by frame on a crop around the digit (the classifier is fit on such crops
of real digits), and each clip gets the majority vote.
Prints `RESULT prompt_accuracy=<fraction>`.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from data import load_digit_images, moving_clip
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC


def to_features(images: torch.Tensor) -> np.ndarray:
    """Images (N, 1, H, W) in [-1, 1] -> sklearn-style digits (N, 64) in 0..16."""
    pooled = F.adaptive_avg_pool2d(images.float(), 8)
    return ((pooled.clamp(-1, 1) + 1) * 8).flatten(1).numpy()


def crop_digits(frames: torch.Tensor) -> torch.Tensor:
    """Square crops of half the frame size around each frame's centre of brightness.

    frames: (N, 1, H, W) in [-1, 1] -> (N, 1, H/2, W/2).
    """
    n, _, h, w = frames.shape
    size = h // 2
    weights = (frames[:, 0] + 1).clamp(min=0) + 1e-6  # (N, H, W)
    rows = (weights.sum(2) * torch.arange(h)).sum(1) / weights.sum((1, 2))
    cols = (weights.sum(1) * torch.arange(w)).sum(1) / weights.sum((1, 2))
    tops = (rows - size / 2 + 0.5).round().long().clamp(0, h - size)
    lefts = (cols - size / 2 + 0.5).round().long().clamp(0, w - size)
    crops = [
        frame[:, top : top + size, left : left + size]
        for frame, top, left in zip(frames, tops, lefts, strict=True)
    ]
    return torch.stack(crops)


def fit_classifier(video: bool = False, seed: int = 0) -> tuple[SVC, float]:
    """An SVM on 80% of the real digits, and its accuracy on the other 20%.

    Images: the 32x32 digits. Video: crops (see `crop_digits`) of half-size digits at five positions
    across a 32x32 frame, so that the classifier sees what it will be asked about.
    """
    images, labels = load_digit_images(16 if video else 32)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels.numpy(), random_state=seed
    )

    def features(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not video:
            return to_features(images[index]), labels[index].numpy()
        clips = torch.stack([moving_clip(images[i], 5, 32, "right") for i in index])  # (n, 1, 5, 32, 32)
        frames = crop_digits(clips.transpose(1, 2).reshape(-1, 1, 32, 32))
        return to_features(frames), labels[index].repeat_interleave(5).numpy()

    classifier = SVC(gamma=0.001, C=10.0).fit(*features(train))
    return classifier, float(classifier.score(*features(test)))


def predict(classifier: SVC, samples: torch.Tensor) -> torch.Tensor:
    """Predicted digit of each sample: images (N, 1, H, W) or videos (N, 1, T, H, W) -> (N,) int64."""
    if samples.dim() == 4:
        return torch.from_numpy(classifier.predict(to_features(samples))).long()
    n, c, t, h, w = samples.shape
    frames = crop_digits(samples.transpose(1, 2).reshape(n * t, c, h, w))
    per_frame = torch.from_numpy(classifier.predict(to_features(frames))).long().view(n, t)
    return per_frame.mode(dim=1).values


def prompt_accuracy(classifier: SVC, samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples classified as the digit their prompt asked for."""
    return (predict(classifier, samples) == labels.long().cpu()).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("samples", help='a .pt file with {"samples": ..., "labels": ...}')
    args = parser.parse_args()

    data = torch.load(args.samples, map_location="cpu")
    classifier, heldout = fit_classifier(video=data["samples"].dim() == 5)
    print(f"classifier held-out accuracy on real digits: {heldout:.4f}")
    accuracy = prompt_accuracy(classifier, data["samples"].float(), data["labels"])
    print(f"RESULT prompt_accuracy={accuracy:.4f}")


if __name__ == "__main__":
    main()
