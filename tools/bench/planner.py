"""The planner against reality: predicted peaks (fake tensors, fake world) vs one real training step, per config.

    uv run python tools/bench/planner.py          # CPU, world 2; ~4 minutes

Workload: the demo DiT (tools/dit.py, dim 256, depth 4, 16 x 16 latents = 64 tokens, 8 samples per rank, 16 text
tokens), AdamW; one config adds a frozen MiniLM-sized BERT (transformers BertModel, random weights) sharded by
``encoder.fsdp``, one a VAE whose encode runs before the step. Nine configurations: DDP, ZeRO-2, ZeRO-3, ZeRO-3 + SP 2, ZeRO-3 + selective checkpointing 0.5,
ZeRO-2 + sharded EMA, ZeRO-3 + the sharded encoder, ZeRO-2 + a VAE's encode (diffusers AutoencoderKL, 3 levels, 8 x 3
x 128 x 128 images per rank), ZeRO-3 + TP 2 (the blocks' attention and MLP split over the two ranks).

Predicted: ``litegen.plan.plans`` in one process over a fake world of 2 (rank 0). Measured: ``litegen.plan.measure``
in a real gloo world of 2 (torchrun, a fresh one per config), the same steps on real tensors, rank 0: the tracker's
peak, and independently the growth of the process's peak resident set over building the model, ``initialize`` and
the steps, after a tiny warm-up of the same config (one-time library set-up is not the step's;
``/proc/self/clear_refs`` resets the peak; glibc's mmap threshold is fixed at 128 KiB so freed tensors return to
the OS). Then the time to plan a 1B-parameter DiT (dim 1536, depth 28) at 8 GPUs, ZeRO-3.
Last lines: ``RESULT planner_max_rel_error``, ``planner_rss_max_rel_error``, ``planner_seconds_1b``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

CONFIGS = {
    "ddp": {"zero_degree": 0},
    "zero2": {"zero_degree": 2},
    "zero3": {"zero_degree": 3},
    "zero3_sp2": {"zero_degree": 3, "sp_size": 2},
    "zero3_selective0.5": {"zero_degree": 3, "selective_ratio": 0.5},
    "zero2_ema_sharded": {"zero_degree": 2, "ema": {"enable": True, "sharded": True}},
    "zero3_minilm_sharded": {"zero_degree": 3, "encoder": {"fsdp": True}},
    "zero2_vae_encode": {"zero_degree": 2},
    "zero3_tp2": {"zero_degree": 3, "tp_size": 2},
}
BATCH, TEXT = 8, 16


def workload(name: str, dim: int = 256, depth: int = 4, heads: int = 4):
    from dit import DiT
    from litegen.plan import Workload

    def model():
        torch.manual_seed(0)
        return DiT(input_size=16, dim=dim, depth=depth, heads=heads)

    def inputs():
        return {
            "x": torch.randn(BATCH, 4, 16, 16),
            "t": torch.rand(BATCH),
            "text": torch.randn(BATCH, TEXT, 384),
        }

    encoders, vae = [], None
    if "minilm" in name:
        from transformers import BertConfig, BertModel

        minilm = BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        )
        encoders = [
            (
                lambda: BertModel(minilm, add_pooling_layer=False).requires_grad_(False),
                lambda: {"input_ids": torch.zeros(BATCH, TEXT, dtype=torch.long)},
            )
        ]
    if "vae" in name:
        from diffusers import AutoencoderKL

        blocks = {"down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}
        vae = (
            lambda: AutoencoderKL(block_out_channels=[32, 64, 64], latent_channels=4, **blocks),
            lambda: {"x": torch.randn(BATCH, 3, 128, 128)},
        )
    return Workload(model=model, inputs=inputs, encoders=encoders, vae=vae)


def predict() -> dict:
    from litegen.plan import plans

    out = {}
    for name, config in CONFIGS.items():
        (result,) = plans([config], workload(name), world_size=2)
        out[name] = result.peak
    start = time.perf_counter()
    plans_1b = list(plans([{"zero_degree": 3}], workload("1b", dim=1536, depth=28, heads=16), world_size=8))
    out["seconds_1b"] = time.perf_counter() - start
    out["params_1b"] = plans_1b[0].parts.get("parameters", 0) * 8 // 4
    return out


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(name: str) -> dict:
    """One config in this fresh process: a tiny warm-up of it (one-time library set-up), then the real step."""
    import torch.distributed as dist
    from litegen.plan import measure as measured

    dist.init_process_group("gloo")
    config = CONFIGS[name]
    measured(config, workload(name, dim=32, depth=1, heads=2))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set
    before = status_bytes("VmRSS")
    result = measured(config, workload(name))
    out = {"tracked": result.peak, "rss": status_bytes("VmHWM") - before}
    dist.destroy_process_group()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=["predict", "measure"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role is not None:
        result = predict() if args.role == "predict" else measure(args.config)
        if args.role == "predict" or int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(result))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"planner_bench_{os.getpid()}"
    work.mkdir(exist_ok=True)
    me = [str(Path(__file__).resolve())]
    subprocess.run(
        [sys.executable, *me, "--role", "predict", "--out", str(work / "p.json")], env=env, check=True
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port())]  # fmt: skip
    real = {}
    for name in CONFIGS:  # a fresh world per config: memory freed by one config would hide the next one's
        out = work / f"m_{name}.json"
        subprocess.run(
            [*torchrun, *me, "--role", "measure", "--config", name, "--out", str(out)], env=env, check=True
        )
        real[name] = json.loads(out.read_text())
    predicted = json.loads((work / "p.json").read_text())
    errors, rss_errors = [], []
    print(f"{'config':<24}{'predicted':>12}{'tracked':>12}{'rss growth':>12}{'err':>8}{'rss err':>9}")
    for name in CONFIGS:
        p, t, r = predicted[name], real[name]["tracked"], real[name]["rss"]
        errors.append(abs(p - t) / t)
        rss_errors.append(abs(p - r) / r)
        print(
            f"{name:<24}{p / 2**20:>10.1f}Mi{t / 2**20:>10.1f}Mi{r / 2**20:>10.1f}Mi{errors[-1]:>8.3f}{rss_errors[-1]:>9.3f}"
        )
    print(
        f"1B-parameter DiT ({predicted['params_1b'] / 1e9:.2f}B) planned at 8 GPUs, ZeRO-3, in {predicted['seconds_1b']:.1f} s"
    )
    print(f"RESULT planner_max_rel_error={max(errors):.4f}")
    print(f"RESULT planner_rss_max_rel_error={max(rss_errors):.4f}")
    print(f"RESULT planner_seconds_1b={predicted['seconds_1b']:.1f}")


if __name__ == "__main__":
    main()
