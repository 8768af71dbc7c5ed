"""Where the trainer's numbers and pictures go: loss.csv, TensorBoard events, PNG grids (rank 0 only).

    uv run tensorboard --logdir runs/<name>          # after a run with --report-to tensorboard

Scalars, every `log_every` steps: loss, lr, grad_norm, loss_scale, skipped_steps, step_time (s),
samples_per_s, peak_memory (MiB: CUDA's max_memory_allocated on a GPU, the process's peak RSS on a CPU);
images: `samples`, the grid of the sample prompts drawn every `sample_every` steps.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
from PIL import Image

TARGETS = ("csv", "tensorboard", "none")
COLUMNS = (
    "step",
    "loss",
    "lr",
    "grad_norm",
    "loss_scale",
    "skipped_steps",
    "step_time",
    "samples_per_s",
    "peak_memory",
    "seconds",
)


def report_targets(text: str) -> set[str]:
    """`--report-to` value: a comma-separated subset of csv, tensorboard; or none."""
    targets = {t.strip() for t in text.split(",") if t.strip()}
    bad = sorted(targets - set(TARGETS))
    if bad or not targets or ("none" in targets and len(targets) > 1):
        raise ValueError(f"--report-to {text!r}: allowed: csv, tensorboard, csv,tensorboard or none")
    return targets - {"none"}


def peak_memory_mib(device: torch.device) -> float:
    """The process's peak memory so far: CUDA's max_memory_allocated on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """Images (rows * cols, c, h, w) in [-1, 1], row by row -> one uint8 picture (c, rows * h, cols * w)."""
    n, c, h, w = images.shape
    cols = n // rows
    grid = (
        images[: rows * cols].view(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
    )
    return ((grid.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_png(grid: torch.Tensor, path: Path, scale: int = 3) -> None:
    """A uint8 (c, H, W) picture as a PNG, enlarged `scale` times (nearest neighbour)."""
    array = grid[0].numpy() if grid.shape[0] == 1 else grid.permute(1, 2, 0).numpy()
    _, h, w = grid.shape
    Image.fromarray(array).resize((w * scale, h * scale), Image.NEAREST).save(path)


class Report:
    """The run's log on rank 0: `loss.csv` (target csv), TensorBoard events in `out` (target tensorboard).

    Elsewhere (`enabled=False`) every method does nothing. `start_step` > 0 continues a resumed run: its CSV
    is appended to (a new one gets its header), TensorBoard drops events an earlier run logged after that step.
    """

    def __init__(self, out: Path, targets: set[str], enabled: bool, start_step: int = 0):
        self.out = out
        self.csv = None
        self.writer = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if "csv" in targets:
            path = out / "loss.csv"
            fresh = not start_step or not path.is_file() or path.stat().st_size == 0
            self.csv = path.open("w" if fresh else "a", newline="")
            if fresh:
                self.csv.write(",".join(COLUMNS) + "\n")
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out), purge_step=start_step or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One row / one event per value; `values` holds COLUMNS' names but `step`."""
        if self.csv is not None:
            self.csv.write(",".join([str(step)] + [f"{values[c]:.6g}" for c in COLUMNS[1:]]) + "\n")
            self.csv.flush()
        if self.writer is not None:
            for name in COLUMNS[1:-1]:
                self.writer.add_scalar(name, values[name], step)
            self.writer.flush()

    def image(self, tag: str, step: int, grid: torch.Tensor) -> None:
        """A uint8 (c, H, W) picture under `tag`."""
        if self.writer is not None:
            self.writer.add_image(tag, grid, step, dataformats="CHW")
            self.writer.flush()

    def close(self) -> None:
        if self.csv is not None:
            self.csv.close()
        if self.writer is not None:
            self.writer.close()
