"""initialize(): classification, order, error cases, and save/resume through the facade."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from litegen import LiteGen, ResumableLoader, ResumableSampler
from tiny_dit import TEXT, TOKENS, make_model_and_optimizer
from torch import nn
from torch.utils.data import Dataset, IterableDataset

KINDS = ("model", "optimizer", "encoder", "dataset", "encode")


class Samples(Dataset):
    """Deterministic samples; each carries its index so tests can see which samples were used."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {
            "index": torch.tensor(i),
            "x": torch.randn(TOKENS, 4, generator=g),
            "text": torch.randn(TEXT, 8, generator=g),
            "target": torch.randn(TOKENS, 4, generator=g),
        }


def encode(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def check_every_order() -> list[str]:
    """For every permutation of the five kinds, initialize returns each object's result in its place."""
    failures = []
    for order in itertools.permutations(KINDS):
        gen = LiteGen({"global_batch_size": 2})
        model, opt = make_model_and_optimizer()
        objs = {
            "model": model,
            "optimizer": opt,
            "encoder": nn.Linear(3, 3).requires_grad_(False),
            "dataset": Samples(),
            "encode": encode,
        }
        out = gen.initialize(*(objs[k] for k in order))
        got = dict(zip(order, out, strict=True))
        ok = (
            isinstance(got["model"], nn.Module)
            and any(p.requires_grad for p in got["model"].parameters())
            and isinstance(got["optimizer"], torch.optim.Optimizer)
            and {id(p) for g in got["optimizer"].param_groups for p in g["params"]}
            <= {id(p) for p in got["model"].parameters()}
            and isinstance(got["encoder"], nn.Linear)
            and not got["encoder"].training
            and isinstance(got["dataset"], ResumableLoader)
            and torch.equal(got["encode"](torch.ones(2)), torch.full((2,), 2.0))
        )
        if not ok:
            failures.append(str(order))
        gen.close()
    return failures


def test_every_order_of_the_five_kinds(dist_pool):
    assert dist_pool.run(check_every_order, world_size=1, timeout=300) == [[]]


def single_object_is_unwrapped() -> bool:
    gen = LiteGen({"global_batch_size": 2})
    loader = gen.initialize(Samples())
    gen.close()
    return isinstance(loader, ResumableLoader)


def test_a_single_object_comes_back_unwrapped(dist_pool):
    assert dist_pool.run(single_object_is_unwrapped, world_size=1) == [True]


class Stream(IterableDataset):
    def __iter__(self):
        yield 1


def initialize_error(case: str) -> str:
    gen = LiteGen({})
    model, opt = make_model_and_optimizer()
    args = {
        "two_models": (model, nn.Linear(2, 2)),
        "iterable": (model, Stream()),
        "bad_type": (model, 42),
        "optimizer_alone": (opt,),
        "two_optimizers": (model, opt, torch.optim.SGD(model.parameters(), lr=0.1)),
        "no_batch_size": (model, Samples()),
    }[case]
    try:
        gen.initialize(*args)
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        gen.close()
    return "no error"


@pytest.mark.parametrize(
    ("case", "text"),
    [
        (
            "two_models",
            "exactly one trainable nn.Module is allowed, got argument 0 (TinyDiT), argument 1 (Linear)",
        ),
        ("iterable", "TypeError: initialize: argument 1 is an IterableDataset (Stream)"),
        ("bad_type", "TypeError: initialize: argument 1 has type int"),
        ("optimizer_alone", "the optimizer (argument 0) needs its trainable model"),
        ("two_optimizers", "at most one optimizer is allowed, got arguments [1, 2]"),
        ("no_batch_size", "global_batch_size is null, but argument 1 is a Dataset"),
    ],
)
def test_initialize_errors(dist_pool, case, text):
    (message,) = dist_pool.run(initialize_error, case, world_size=1)
    assert text in message


def train_with_resume(root: str, cfg: dict, stop_at: int | None, total: int) -> dict:
    """Train ``total`` steps from the facade's dataloader; with ``stop_at``, save there, rebuild everything
    (new LiteGen, new model) and resume. Returns the sample indices each step used and the weights."""
    seen: list[list[int]] = []

    def run(gen, model, opt, loader, steps):
        batches = gen.batches()
        for _ in range(steps):
            b = next(batches)
            seen.append(b["index"].tolist())
            t = torch.full((b["x"].shape[0],), 0.5)
            loss = F.mse_loss(model(b["x"], t, b["text"]), b["target"])
            loss.backward()
            opt.step()
            opt.zero_grad()
            if gen.ema is not None:
                gen.ema.update(gen.start_step + len(seen))
        if gen.start_step + steps == total:  # max_steps reached: batches() ends
            assert next(batches, None) is None

    full = {**cfg, "checkpoint_dir": root, "global_batch_size": 4, "max_steps": total}
    gen = LiteGen(full)
    model, opt, loader = gen.initialize(*make_model_and_optimizer(), Samples())
    first = total if stop_at is None else stop_at
    run(gen, model, opt, loader, first)
    if stop_at is not None:
        gen.save(stop_at)
        gen.close()
        gen = LiteGen({**full, "auto_resume": True})
        model, opt, loader = gen.initialize(*make_model_and_optimizer(seed=99), Samples())
        assert gen.start_step == stop_at
        run(gen, model, opt, loader, total - stop_at)
    state = gen.full_state_dict()
    ema = gen.ema.full_state_dict() if gen.ema is not None else {}
    gen.close()
    return {"seen": seen, "state": state, "ema": ema}


@pytest.mark.parametrize(
    "cfg",
    [{"zero_degree": 3, "ema": {"enable": True}}, {"zero_degree": 1, "sp_size": 2}],
    ids=["zero3-ema", "zero1-sp2"],
)
def test_resume_mid_epoch_equals_uninterrupted(dist_pool, tmp_path, cfg):
    straight = dist_pool.run(train_with_resume, str(tmp_path / "a"), cfg, None, 7, world_size=2, timeout=180)
    resumed = dist_pool.run(train_with_resume, str(tmp_path / "b"), cfg, 3, 7, world_size=2, timeout=180)
    for a, b in zip(straight, resumed, strict=True):
        assert a["seen"] == b["seen"]  # 24 samples / 4 per step: crosses an epoch boundary at step 6
    for key in straight[0]["state"]:
        assert torch.equal(straight[0]["state"][key], resumed[0]["state"][key]), key
    for key in straight[0]["ema"]:
        assert torch.equal(straight[0]["ema"][key], resumed[0]["ema"][key]), key


def too_small_dataset() -> str:
    gen = LiteGen({"global_batch_size": 32})
    try:
        gen.initialize(Samples())  # 24 samples: 12 per dp rank, less than its batch of 16
    except ValueError as exc:
        return str(exc)
    finally:
        gen.close()
    return "no error"


def test_a_dataset_that_gives_a_rank_no_batch_is_refused_on_every_rank(dist_pool):
    for message in dist_pool.run(too_small_dataset, world_size=2):
        assert "has 24 samples" in message and "dp_size=2" in message and "its batch of 16" in message


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def draws_around_a_resume(root: str, resume_sp: int) -> dict:
    """Two steps at dp 2 x sp 1 (one draw each), save, two more draws; then resume at sp ``resume_sp``
    and draw again. Returns the draws, the indices of the first batch after the resume, and the log."""
    config = {"checkpoint_dir": root, "global_batch_size": 4}
    gen = LiteGen(config)
    loader = gen.initialize(Samples())
    batches = gen.batches()
    for _ in range(2):
        next(batches)
        torch.rand(1)
    gen.save(2)
    uninterrupted = torch.rand(4)
    gen.close()
    messages = Messages()
    logging.getLogger("litegen").addHandler(messages)
    try:
        gen = LiteGen({**config, "sp_size": resume_sp, "auto_resume": True})
        loader = gen.initialize(Samples())
    finally:
        logging.getLogger("litegen").removeHandler(messages)
    assert gen.start_step == 2
    resumed = torch.rand(4)
    indices = next(iter(loader))["index"].tolist()
    gen.close()
    return {"uninterrupted": uninterrupted, "resumed": resumed, "indices": indices, "log": messages.lines}


def test_resume_under_the_same_layout_continues_every_rng_stream(dist_pool, tmp_path):
    ranks = dist_pool.run(draws_around_a_resume, str(tmp_path), 1, world_size=2, timeout=120)
    for rank in ranks:
        assert torch.equal(rank["resumed"], rank["uninterrupted"])
    assert not torch.equal(ranks[0]["resumed"], ranks[1]["resumed"])  # distinct noise per dp rank
    assert not any("re-derived" in line for line in ranks[0]["log"])


def test_resume_under_another_layout_gives_sp_peers_the_same_noise_and_the_rest_of_the_epoch(
    dist_pool, tmp_path
):
    """Saved at dp 2 x sp 1, resumed at dp 1 x sp 2: the two ranks are SP peers now."""
    ranks = dist_pool.run(draws_around_a_resume, str(tmp_path), 2, world_size=2, timeout=120)
    assert torch.equal(ranks[0]["resumed"], ranks[1]["resumed"])
    epoch = list(ResumableSampler(24, dp_rank=0, dp_size=1, seed=0))
    assert ranks[0]["indices"] == ranks[1]["indices"] == epoch[8:12]
    assert any("dp 2 x sp 1 (world 2), resumed at dp 1 x sp 2" in line for line in ranks[0]["log"])


def partly_loaded(root: str) -> list[str]:
    """Save steps 1 and 2, flip bytes in a step-2 shard (same size), resume it: what each call says."""
    from pathlib import Path

    from litegen_ckpt import CheckpointError

    cfg = {"checkpoint_dir": root, "global_batch_size": 2}
    gen = LiteGen(cfg)
    model, opt = gen.initialize(*make_model_and_optimizer())
    gen.save(1)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    gen.save(2)
    gen.close()
    shard = max((Path(root) / "step_2").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a modified tensor, found while it is read
    shard.write_bytes(bytes(data))
    said = []
    gen = LiteGen(cfg)
    gen.initialize(*make_model_and_optimizer(seed=5))
    for call in (lambda: gen.resume(2), lambda: gen.save(3), lambda: gen.resume(1), lambda: gen.save(3)):
        try:
            call()
            said.append("ok")
        except (CheckpointError, ValueError) as error:
            said.append(str(error))
    gen.close()
    return said


def test_a_failed_resume_says_the_objects_are_partly_loaded_and_save_refuses_until_a_good_one(
    dist_pool, tmp_path
):
    resume, save, good, save_again = dist_pool.run(partly_loaded, str(tmp_path), world_size=1)[0]
    assert "does not match the checksum" in resume and "may now hold part of this checkpoint" in resume
    assert "save(3): the live objects may hold part of a checkpoint" in save
    assert (good, save_again) == ("ok", "ok")


def losses_and_an_encode() -> list[str]:
    """initialize(model, optimizer, two losses, an encode): the losses come back as they are; the log lines."""
    messages = Messages()
    logging.getLogger("litegen").addHandler(messages)
    gen = LiteGen({})
    mse = nn.MSELoss()
    try:
        out = gen.initialize(*make_model_and_optimizer(), mse, F.mse_loss, lambda x: x * 2)
    finally:
        logging.getLogger("litegen").removeHandler(messages)
        gen.close()
    assert out[2] is mse and out[3] is F.mse_loss
    assert torch.equal(out[4](torch.ones(2)), torch.full((2,), 2.0))
    return messages.lines


def test_a_loss_is_returned_unchanged_and_the_log_names_the_encode(dist_pool):
    (lines,) = dist_pool.run(losses_and_an_encode, world_size=1)
    assert "initialize: argument 2 (MSELoss) is a loss: returned unchanged" in lines, lines
    assert "initialize: argument 3 (mse_loss) is a loss: returned unchanged" in lines, lines
    assert any(
        line.startswith("initialize: argument 4 (losses_and_an_encode.<locals>.<lambda>) is the encode")
        for line in lines
    ), lines
