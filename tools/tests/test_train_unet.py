"""The UNet job of the demo trainer: its three configs train in fp16 (on the shared worker pool's ranks),
TensorBoard gets every scalar and the sample grid, `litegen.KEY=value` overrides reach LiteGen."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import train_on_every_rank

TOOLS = Path(__file__).resolve().parents[1]
TINY_UNET = [
    "litegen.global_batch_size=8",
    "unet_channels=[16, 32]",
    "unet_heads=2",
    "log_every=2",
    "sample_every=2",
    "samples_per_digit=1",
    "sample_steps=2",
]


def _load(overrides: list[str]):
    import train

    return train.load(str(TOOLS / "configs/unet_ddp.yaml"), overrides)


def test_litegen_overrides_reach_the_litegen_section_and_bad_keys_are_refused():
    litegen, cfg = _load(
        [
            "litegen.precision=bf16",
            "litegen.ema.decay=0.99",
            "litegen.vae.slice_size=4",
            "steps=3",
            "train.lr=2e-3",
        ]
    )
    assert litegen["precision"] == "bf16" and litegen["zero_degree"] == 0
    assert litegen["ema"]["decay"] == 0.99 and litegen["ema"]["warmup"] is True  # the rest of ema: kept
    assert litegen["vae"] == {"slice_size": 4}
    assert (cfg.steps, cfg.lr, cfg.model) == (3, 2e-3, "unet")
    for override, message in [
        ("litegen.zero_degre=2", "did you mean 'zero_degree'"),
        ("litegen.ema.decai=0.9", "did you mean 'ema.decay'"),
        ("litegen.precision=fp8", "precision"),
        ("litegen.zero_degree.x=1", "litegen.zero_degree is 0, not a section"),
        ("litegen.precision", "expected key=value"),
    ]:
        with pytest.raises(SystemExit, match=message.replace(".", r"\.")):
            _load([override])


def test_unet_configs_train_and_tensorboard_gets_every_scalar_and_the_grid(tmp_path, dist_pool):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for config in ("unet_zero2", "unet_ddp", "unet_zero3_offload"):  # fp16, as the configs say
        out = tmp_path / config
        report_to = "csv,tensorboard" if config == "unet_zero2" else "none"
        argv = ["--config", str(TOOLS / f"configs/{config}.yaml"), "--report-to", report_to, "steps=4"]
        accuracy = dist_pool.run(
            train_on_every_rank, [*argv, f"out_dir={out}", *TINY_UNET], world_size=2, timeout=240
        )
        assert 0.0 <= accuracy[0] <= 1.0 and accuracy[1] is None, config
        for name in (
            "samples.png",
            "samples.pt",
            "samples_step2.png",
            "samples_step4.png",
            "checkpoints/step_4",
        ):
            assert (out / name).exists(), (config, name)
        if report_to == "none":
            assert not (out / "loss.csv").exists() and not list(out.glob("events.out.tfevents.*"))

    out = tmp_path / "unet_zero2"
    assert [line.split(",")[0] for line in (out / "loss.csv").read_text().splitlines()] == ["step", "2", "4"]
    events = list(out.glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # rank 0 only
    accumulator = EventAccumulator(str(out))
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {
        "loss",
        "lr",
        "grad_norm",
        "loss_scale",
        "skipped_steps",
        "step_time",
        "samples_per_s",
        "peak_memory",
    }
    assert scalars <= set(tags["scalars"]), tags["scalars"]
    assert [e.step for e in accumulator.Scalars("loss")] == [2, 4]
    assert accumulator.Scalars("loss_scale")[-1].value > 1  # fp16: the loss is scaled
    assert accumulator.Scalars("peak_memory")[-1].value > 100  # MiB of peak RSS
    assert [e.step for e in accumulator.Images("samples")] == [2, 4]
