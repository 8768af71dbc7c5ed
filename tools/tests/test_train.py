"""Smoke tests of the demo trainer: it trains, checkpoints, resumes and draws, under torchrun (world 2)."""

from __future__ import annotations

from pathlib import Path

from launch import run

TOOLS = Path(__file__).resolve().parents[1]
TINY = ["dim=32", "depth=2", "heads=4", "log_every=2", "samples_per_digit=1", "sample_steps=2"]


def test_default_config_trains_checkpoints_resumes_and_draws(tmp_path):
    out = tmp_path / "run"
    first = run(["--config", str(TOOLS / "configs/default.yaml"), "steps=4", f"out_dir={out}", *TINY])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "RESULT prompt_accuracy=" in first.stdout
    for name in [
        "loss.csv",
        "loss.png",
        "samples.png",
        "samples.pt",
        "checkpoints/step_4",
        "checkpoints/latest",
    ]:
        assert (out / name).exists(), name
    resumed = run(
        ["--config", str(TOOLS / "configs/default.yaml"), "--resume", "steps=6", f"out_dir={out}", *TINY]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stderr and "from step 4" in resumed.stderr
    assert (out / "checkpoints/step_6").exists()
    assert [line.split(",")[0] for line in (out / "loss.csv").read_text().splitlines()] == [
        "step",
        "2",
        "4",
        "6",
    ]


def test_video_sp2_config_trains_and_writes_clips(tmp_path):
    out = tmp_path / "video"
    proc = run(
        [
            "--config",
            str(TOOLS / "configs/video_sp2.yaml"),
            "steps=2",
            "num_frames=4",
            "sample_every=2",
            f"out_dir={out}",
            *TINY,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "samples.gif").exists() and (out / "samples_strip.png").exists()
    assert (out / "samples_step2.png").exists()  # a row of frames per clip
    assert "sequence parallel over 2 ranks" in proc.stderr


def test_bad_config_and_missing_asset_give_one_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("litegen:\n  zero_degre: 2\ntrain:\n  steps: 2\n")
    proc = run(["--config", str(bad)], nproc=None)
    assert proc.returncode != 0 and "did you mean 'zero_degree'" in proc.stderr
    proc = run(["--config", str(TOOLS / "configs/default.yaml"), "stepz=3"], nproc=None)
    assert proc.returncode != 0 and "unknown train key(s) ['stepz']" in proc.stderr
    proc = run(["--config", str(TOOLS / "configs/default.yaml"), "vae=no_such_vae"], nproc=None)
    assert proc.returncode != 0 and "missing asset" in proc.stderr and "no_such_vae.json" in proc.stderr
