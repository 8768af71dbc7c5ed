"""Scenario 3: a rank that stops calling collectives makes the others fail, within collective_timeout, with a
``CollectiveTimeoutError`` that names the collective; torchrun then ends the whole job (nothing hangs).

Two runs at once (they mostly wait): ZeRO-3, where rank 0 waits in the parameter all-gather of the next
forward, and DDP with async checkpoints, where it waits in the gradient all-reduce of the next backward. In the
ZeRO-3 run rank 1 also starts later than ``collective_timeout``: joining the world is not a collective.
"""

from __future__ import annotations

import json

from reliability_launch import wait_for

TIMEOUT_S = 10
RUNS = {  # name: config, the collective rank 0 waits in, extra trainer arguments
    # rank 1 also joins the world later than collective_timeout: the rendezvous waits for it (torch's default)
    "zero3-forward": (
        {"zero_degree": 3},
        "gloo:all_gather on process group 'default_pg'",
        ["--start-late", "1:15"],
    ),
    "ddp-backward": (
        {"zero_degree": 0, "checkpoint_async": True},
        "gloo:all_reduce on process group 'default_pg'",
        [],
    ),
}


def test_a_hung_peer_fails_the_others_with_a_named_timeout(tmp_path, launch):
    runs = {}
    for name, (config, _, extra) in RUNS.items():
        config = {**config, "collective_timeout": TIMEOUT_S}
        runs[name] = launch(
            tmp_path / name,
            "--steps",
            "50",
            "--save-every",
            "4",
            "--config",
            json.dumps(config),
            "--stop",
            "1:4",
            *extra,
        )  # rank 1 stops calling collectives after step 4 (and its save)
    for name, run in runs.items():
        run_dir = tmp_path / name
        wait_for(
            lambda run_dir=run_dir: (run_dir / "stopped").exists(), 180, f"{name}: rank 1 at step 4", run
        )
        assert run.wait(TIMEOUT_S + 120) != 0
        log = run.log.read_text(errors="replace")
        message = f"litegen.runtime.CollectiveTimeoutError: LiteGen training loop: {RUNS[name][1]}"
        assert message in log, run.tail()
        assert f"did not complete within collective_timeout={TIMEOUT_S} s" in log, run.tail()
        stopped = (run_dir / "stopped").stat().st_mtime
        failed = float((run_dir / "progress" / "error_rank0.txt").read_text().split()[0])
        assert TIMEOUT_S - 1 <= failed - stopped <= TIMEOUT_S + 5, (
            f"{name}: rank 0 failed {failed - stopped:.1f} s after rank 1 stopped"
        )
