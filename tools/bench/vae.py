"""VAE encode: peak memory unsliced vs ``sliced(..., 4)``, and ``data_parallel`` time on 2 ranks vs 1.

    uv run python tools/bench/vae.py                 # CPU/gloo; CUDA peak memory when CUDA is present

The encoder is a small AutoencoderKL (random weights, no download) called as
``lambda x: vae.encode(x).latent_dist.mode()`` under ``torch.no_grad()`` on a batch of 32 RGB images.

Memory: each variant runs in a fresh process, which first encodes one 16 x 16 image (one-time library
set-up such as oneDNN kernels is not the encode's). On CUDA, the peak of ``torch.cuda.max_memory_allocated``
during the encode minus the memory allocated before it; on CPU, the process's peak resident set (VmHWM
in /proc/self/status) after the encode minus its resident set (VmRSS) before it: both count the
activations and the output, not the weights or the input batch. On CPU glibc's mmap threshold is fixed
at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) in both variants, so freed tensors return to the OS and the
resident peak follows the live tensors instead of heap fragmentation.

3-D (``time_parallel``, one 1 x 3 x 33 x 64 x 64 clip, 2 ranks vs 1): memory on
AutoencoderKLHunyuanVideo(block_out_channels=(32, 64, 64), temporal and spatial ratio 4, tiling and
frame-wise encoding off), each variant in fresh processes after a warm-up encode (which also runs
time_parallel's one-time exactness probe), the peak resident set reset (``/proc/self/clear_refs``)
before the encode: the single process's peak vs the larger of the two ranks' peaks. Time on
AutoencoderKLWan(base_dim=32, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[True,
True]) whose own encode already runs in cached chunks: its plain ``vae.encode`` on rank 0 and
``time_parallel`` over both ranks, alternately, as below. The error is the largest absolute difference
of the latents (``latent_dist.parameters``) from the single-process encode, for both VAEs.

Time: 2 processes with one thread each form a gloo group and pass the same batch to
``data_parallel(encode)`` over both ranks and over a 1-rank group, alternately (same load for both on
a shared machine). One warm-up round, then the median of ``--repeats`` rounds; each call starts after a
barrier and is timed until the last rank is done.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, AutoencoderKLHunyuanVideo, AutoencoderKLWan
from litegen_vae import data_parallel, sliced, time_parallel

SLICE_SIZE = 4
CLIP = (1, 3, 33, 64, 64)


def small_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return (
        AutoencoderKL(
            block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=128,
        )
        .eval()
        .requires_grad_(False)
    )


def encoder_and_batch(args: argparse.Namespace, device: torch.device):
    vae = small_vae().to(device)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(
        device
    )
    return (lambda x: vae.encode(x).latent_dist.mode()), images


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


def measure_memory(args: argparse.Namespace) -> None:
    """Worker: one encode in this fresh process; prints ``PEAK <bytes>``."""
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encode, images = encoder_and_batch(args, device)
    if args.variant == "sliced":
        encode = sliced(encode, SLICE_SIZE)
    with torch.no_grad():
        encode(images[:1, :, :16, :16])
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            latents = encode(images)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            before = proc_status_bytes("VmRSS")
            latents = encode(images)
            peak = proc_status_bytes("VmHWM") - before
    print(f"PEAK {peak} {tuple(latents.shape)}", flush=True)


def video_vae(name: str) -> AutoencoderKLWan | AutoencoderKLHunyuanVideo:
    torch.manual_seed(0)
    if name == "wan":
        vae = AutoencoderKLWan(
            base_dim=32, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[True, True]
        )
    else:
        vae = AutoencoderKLHunyuanVideo(
            block_out_channels=(32, 64, 64),
            down_block_types=("HunyuanVideoDownBlock3D",) * 3,
            up_block_types=("HunyuanVideoUpBlock3D",) * 3,
            spatial_compression_ratio=4,
            temporal_compression_ratio=4,
        )
        vae.use_framewise_encoding = False
    return vae.eval().requires_grad_(False)


def video_clip() -> torch.Tensor:
    return torch.randn(CLIP, generator=torch.Generator().manual_seed(1))


def measure_memory_3d(args: argparse.Namespace) -> None:
    """Worker: HunyuanVideo encode of the clip, plain (1 process) or time-parallel (2); ``PEAK <bytes>``."""
    torch.set_num_threads(1)
    vae, clip = video_vae("hunyuan"), video_clip()
    if args.variant == "time_parallel":
        dist.init_process_group("gloo")
        encode = time_parallel(vae)
    else:
        encode = vae.encode
    with torch.no_grad():
        encode(clip[:, :, :9])  # warm-up (and time_parallel's exactness probe)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set
        before = proc_status_bytes("VmRSS")
        encode(clip)
        peak = proc_status_bytes("VmHWM") - before
    if dist.is_initialized():
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak)
        peak = max(peaks)
        dist.destroy_process_group()
    print(f"PEAK {peak}", flush=True)


def measure_time_3d(args: argparse.Namespace) -> None:
    """Worker: one of 2 ranks; rank 0 prints ``TIME <plain s> <2-rank s> <ratios> <max abs error>``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, clip, errors = dist.get_rank(), video_clip(), []
    with torch.no_grad():
        for name in ("hunyuan", "wan"):  # the error of both, then Wan's times
            vae = video_vae(name)
            encode = time_parallel(vae)
            out = encode(clip).latent_dist.parameters
            if rank == 0:
                errors.append((out - vae.encode(clip).latent_dist.parameters).abs().max().item())
        times: dict[int, list[float]] = {1: [], 2: []}
        variants = {1: vae.encode if rank == 0 else None, 2: encode}
        for _ in range(args.repeats + 1):  # the first round warms up
            for world, variant in variants.items():
                dist.barrier()
                start = time.perf_counter()
                if variant is not None:
                    variant(clip)
                dist.barrier()
                times[world].append(time.perf_counter() - start)
    if rank == 0:
        ratios = [round(one / two, 2) for one, two in zip(times[1][1:], times[2][1:], strict=True)]
        print(
            f"TIME {statistics.median(times[1][1:])} {statistics.median(times[2][1:])} {ratios} {max(errors)}",
            flush=True,
        )
    dist.destroy_process_group()


def measure_time(args: argparse.Namespace) -> None:
    """Worker: one of 2 ranks; rank 0 prints ``TIME <1-rank median s> <2-rank median s> <ratios>``.

    Each round times ``data_parallel`` over a 1-rank group (rank 0; rank 1 waits in a barrier) and then
    over both ranks, so that both see the same load on a shared machine.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    encode, images = encoder_and_batch(args, torch.device("cpu"))
    one_rank = dist.new_group([0])
    variants = {
        1: data_parallel(encode, one_rank) if dist.get_rank() == 0 else None,
        2: data_parallel(encode),
    }
    times: dict[int, list[float]] = {1: [], 2: []}
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first round warms up
            for world, variant in variants.items():
                dist.barrier()
                start = time.perf_counter()
                if variant is not None:
                    variant(images)
                dist.barrier()
                times[world].append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        ratios = [round(one / two, 2) for one, two in zip(times[1][1:], times[2][1:], strict=True)]
        print(
            f"TIME {statistics.median(times[1][1:])} {statistics.median(times[2][1:])} {ratios}", flush=True
        )
    dist.destroy_process_group()


def run_worker(args: argparse.Namespace, role: str, world: int = 1, **extra: str) -> str:
    """Launch ``world`` fresh processes of this script (one thread each); rank 0's output line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        __file__,
        "--role",
        role,
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--repeats",
        str(args.repeats),
    ] + [x for k, v in extra.items() for x in (f"--{k}", v)]
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            GLOO_SOCKET_IFNAME="lo",
        )
        if role.startswith("memory"):
            env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{role} worker failed: {[p.returncode for p in procs]}")
    return next(line for line in outputs[0].splitlines() if line.startswith(("PEAK", "TIME")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=["main", "memory", "time", "memory3d", "time3d"], default="main")
    parser.add_argument(
        "--variant", choices=["unsliced", "sliced", "plain", "time_parallel"], default="unsliced"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="image height and width")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.role == "memory":
        return measure_memory(args)
    if args.role == "time":
        return measure_time(args)
    if args.role == "memory3d":
        return measure_memory_3d(args)
    if args.role == "time3d":
        return measure_time_3d(args)

    where = "CUDA max_memory_allocated" if torch.cuda.is_available() else "CPU peak RSS (VmHWM) delta"
    print(f"encode {args.batch} x 3 x {args.size} x {args.size}, small AutoencoderKL; memory: {where}")
    peaks = {}
    for variant in ("unsliced", "sliced"):
        line = run_worker(args, "memory", variant=variant)
        peaks[variant] = int(line.split()[1])
        print(
            f"{variant:>9}{f'({SLICE_SIZE})' if variant == 'sliced' else '':<4} peak {peaks[variant] / 2**20:8.1f} MiB  "
            f"latents {line.split(maxsplit=2)[2]}"
        )
    line = run_worker(args, "time", world=2)
    seconds = {1: float(line.split()[1]), 2: float(line.split()[2])}
    for world in (1, 2):
        print(f"data_parallel on {world} rank(s), 1 thread each: {seconds[world]:.3f} s per encode (median)")
    print(f"per-round speedups: {line.split(maxsplit=3)[3]}")
    print(f"RESULT sliced_peak_mem_ratio={peaks['unsliced'] / peaks['sliced']:.2f}")
    print(f"RESULT dp2_encode_speedup={seconds[1] / seconds[2]:.2f}")

    print(f"time_parallel, one {' x '.join(map(str, CLIP))} clip, 2 ranks vs 1 (1 thread each)")
    peaks3d = {
        world: int(run_worker(args, "memory3d", world, variant=variant).split()[1])
        for world, variant in ((1, "plain"), (2, "time_parallel"))
    }
    for world in (1, 2):
        print(f"HunyuanVideo encode on {world} rank(s): peak {peaks3d[world] / 2**20:8.1f} MiB per rank")
    line = run_worker(args, "time3d", world=2).split(maxsplit=3)
    ratios, error = line[3].rsplit(maxsplit=1)
    print(
        f"Wan encode: plain {float(line[1]):.3f} s, time-parallel on 2 ranks {float(line[2]):.3f} s (medians)"
    )
    print(f"per-round speedups: {ratios}")
    print(f"RESULT vae3d_peak_mem_per_rank_over_single={peaks3d[2] / peaks3d[1]:.2f}")
    print(f"RESULT vae3d_dp2_encode_speedup={float(line[1]) / float(line[2]):.2f}")
    print(f"RESULT vae3d_max_abs_err_fp32={float(error):.1e}")


if __name__ == "__main__":
    main()
