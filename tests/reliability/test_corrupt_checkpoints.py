"""Scenario 4: corrupted checkpoints. A truncated shard, a missing or garbled metadata file, a shard from another
run, a latest that points nowhere: ``resume()`` raises an error naming the file (on every rank: no hang);
``auto_resume`` loads the newest checkpoint that verifies instead, with exactly one warning, and the weights it
loads are that checkpoint's.

Two ranks of the shared harness train 3 steps through the facade (ZeRO-3), saving every step; each case
corrupts a copy of that checkpoint root.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from litegen import LiteGen
from small_trainer import Denoiser, Samples

CONFIG = {"zero_degree": 3, "global_batch_size": 4, "log_level": "WARNING"}


def train_and_save(root: str, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    """Three steps, a save after each; the weights saved at each step (rank 0; {} elsewhere)."""
    saved = {}
    with LiteGen({**CONFIG, "checkpoint_dir": root, "global_seed": seed}) as gen:
        model, optimizer, _ = gen.initialize(*make(), Samples())
        batches = gen.batches()
        for step in (1, 2, 3):
            clean = next(batches)
            F.mse_loss(model(clean), clean).backward()
            optimizer.step()
            optimizer.zero_grad()
            gen.save(step)
            saved[step] = gen.full_state_dict()
    return saved


def make() -> tuple[Denoiser, torch.optim.Optimizer]:
    model = Denoiser()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def resume_each(roots: list[str]) -> list[dict]:
    """For each root: the error of a strict resume(), and what auto_resume loaded with which warnings."""
    results = []
    for root in roots:
        result: dict = {}
        with LiteGen({**CONFIG, "checkpoint_dir": root}) as gen:
            gen.initialize(*make())
            try:
                result["strict"] = f"resumed {gen.resume()}"
            except (ValueError, FileNotFoundError) as error:
                result["strict"] = f"{type(error).__name__}: {error}"
        handler = Warnings()
        logging.getLogger("litegen_ckpt").addHandler(handler)
        try:
            with LiteGen({**CONFIG, "checkpoint_dir": root, "auto_resume": True}) as gen:
                gen.initialize(*make())
                result["auto"] = gen.start_step
                result["weights"] = gen.full_state_dict()
        except (ValueError, FileNotFoundError) as error:
            result["auto"] = f"{type(error).__name__}: {error}"
        finally:
            logging.getLogger("litegen_ckpt").removeHandler(handler)
        result["warnings"] = handler.messages
        results.append(result)
    return results


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(10, len(data), 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# case: (how to corrupt run A's checkpoint root, the file the error names, error type); auto_resume then loads
# step 2 (step 3 does not verify), or step 3 when only ``latest`` is broken
CASES = {
    "truncated shard": (
        lambda a, b: truncate(a / "step_3" / "__1_0.distcp"),
        "step_3/__1_0.distcp",
        "CheckpointError",
    ),
    "missing metadata": (
        lambda a, b: (a / "step_3" / ".metadata").unlink(),
        "step_3/.metadata",
        "FileNotFoundError",
    ),
    "garbled metadata": (
        lambda a, b: garble(a / "step_3" / ".metadata"),
        "step_3/.metadata",
        "CheckpointError",
    ),
    "garbled index": (
        lambda a, b: garble(a / "step_3" / "litegen.json"),
        "step_3/litegen.json",
        "CheckpointError",
    ),
    "missing index": (
        lambda a, b: (a / "step_3" / "litegen.json").unlink(),
        "step_3/litegen.json",
        "FileNotFoundError",
    ),
    "shard from another run": (
        lambda a, b: shutil.copy(b / "step_3" / "__0_0.distcp", a / "step_3"),
        "step_3/__0_0.distcp",
        "CheckpointError",
    ),
    "latest points nowhere": (
        lambda a, b: (a / "latest").write_text("step_9"),
        "latest",
        "FileNotFoundError",
    ),
}


@pytest.fixture(scope="module")
def corrupted(dist_pool, tmp_path_factory) -> dict[str, list[dict]]:
    base = tmp_path_factory.mktemp("corrupt")
    run_a, run_b = base / "run_a", base / "run_b"
    saved_a = dist_pool.run(train_and_save, str(run_a), 0, world_size=2, timeout=120)[0]
    dist_pool.run(train_and_save, str(run_b), 1, world_size=2, timeout=120)
    roots = []
    for index, (corrupt, _, _) in enumerate(CASES.values()):
        root = base / f"case_{index}"
        shutil.copytree(run_a, root)
        corrupt(root, run_b)
        roots.append(root)
    every = base / "all_corrupt"  # no checkpoint verifies: auto_resume must not silently start over
    shutil.copytree(run_a, every)
    for step in (1, 2, 3):
        truncate(every / f"step_{step}" / "__0_0.distcp")
    roots.append(every)
    per_rank = dist_pool.run(resume_each, [str(r) for r in roots], world_size=2, timeout=180)
    results = {name: [rank[i] for rank in per_rank] for i, name in enumerate([*CASES, "all corrupt"])}
    return {**results, "saved": saved_a}


@pytest.mark.parametrize("case", list(CASES))
def test_a_corrupted_checkpoint_is_named_and_auto_resume_falls_back(corrupted, case):
    _, named_file, error_type = CASES[case]
    newest_valid = 3 if case == "latest points nowhere" else 2
    for rank, result in enumerate(corrupted[case]):
        assert result["strict"].startswith(f"{error_type}: "), (rank, result["strict"])
        assert named_file in result["strict"], (rank, result["strict"])
        assert result["auto"] == newest_valid, (rank, result)
    loaded, expected = corrupted[case][0]["weights"], corrupted["saved"][newest_valid]
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    warnings = corrupted[case][0]["warnings"]
    assert len(warnings) == 1, warnings
    assert named_file in warnings[0] and f"step_{newest_valid}" in warnings[0], warnings
    assert corrupted[case][1]["warnings"] == []  # one warning for the job: rank 0 logs it


def test_when_no_checkpoint_verifies_auto_resume_says_so(corrupted):
    for result in corrupted["all corrupt"]:
        assert result["auto"].startswith("CheckpointError: no checkpoint under"), result
        for step in (1, 2, 3):
            assert f"step_{step}/__0_0.distcp" in result["auto"]
