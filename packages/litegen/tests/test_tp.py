"""Tensor parallelism through the facade: ``tp_size`` 2 alone (world 2) and × ZeRO-3 dp 2 (world 4).

The tiny DiT (found by structure), PixArt (diffusers ``Attention`` + ``FeedForward``, found by structure),
Flux (its ``_tp_plan``; the single-stream packed ``proj_out`` kept replicated) and SD3 at tp 2 (joint
attention, a context-pre-only last block; by structure) train three AdamW steps like
one process: losses, global gradient norms and final weights (fp32, 1e-5). The tiny DiT also with selective
checkpointing and the sharded EMA (equal to ZeRO-3's EMA); a checkpoint saved at tp 2 x dp 2 resumes at
tp 1 x dp 2 and the reverse, and training continues like one process. TP ranks share their samples.
Refused on every rank before any collective: heads not divisible by tp_size, Wan's QK-norm over all heads,
TP with SP, with DDP, a tp_size that does not divide the world.
"""

from __future__ import annotations

import traceback

import diffusers_models
import pytest
import tiny_dit
import torch
import torch.distributed as dist
from litegen import LiteGen
from litegen.config import LiteGenConfig, check_world
from tiny_dit import assert_trains_like_one_process

STEPS, GLOBAL_BATCH = 3, 4
Combo = tuple[str, dict]  # model name ("tiny_dit" or a diffusers_models name), LiteGen config
WORLD2: list[Combo] = [
    (name, {"tp_size": 2, "zero_degree": 3}) for name in ("tiny_dit", "pixart", "flux", "sd3", "cogvideox")
]
WORLD4: list[Combo] = [(name, {"tp_size": 2, "zero_degree": 3}) for name in ("tiny_dit", "pixart", "flux")]
WORLD4 += [("tiny_dit", {"tp_size": 2, "zero_degree": 2, "selective_ratio": 0.5})]


def combo_id(combo: Combo) -> str:
    return "-".join([combo[0], *(f"{k}{v}" for k, v in combo[1].items())])


def model_and_batches(name: str, dp_rank: int, dp_size: int) -> tuple:
    """The seeded model, its optimizer and this dp rank's part of every global batch."""
    per = GLOBAL_BATCH // dp_size
    start, stop = dp_rank * per, (dp_rank + 1) * per
    if name == "tiny_dit":
        batches = [
            {k: v[start:stop] for k, v in tiny_dit.make_batch(GLOBAL_BATCH, 100 + s).items()}
            for s in range(STEPS)
        ]
        return (*tiny_dit.make_model_and_optimizer(seed=0), batches)
    batches = diffusers_models.make_batches(name, GLOBAL_BATCH, STEPS)
    return (
        *diffusers_models.make_model_and_optimizer(name),
        [diffusers_models.rows(b, start, stop, GLOBAL_BATCH) for b in batches],
    )


def train_steps(name: str, model, opt, batches, gen: LiteGen) -> tuple[list, list]:
    train = tiny_dit.train_steps if name == "tiny_dit" else diffusers_models.train_steps
    return train(model, opt, batches, lambda m: gen.clip_grad_norm_(1e9))


def train_through_facade(name: str, cfg: dict) -> dict:
    gen = LiteGen({**cfg, "global_seed": 0, "global_batch_size": GLOBAL_BATCH})
    rt = gen.runtime
    model, opt, batches = model_and_batches(name, rt.dp_rank, rt.dp_size)
    model, opt = gen.initialize(model, opt)
    losses, norms = train_steps(name, model, opt, batches, gen)
    state = gen.full_state_dict()
    gen.close()
    return {"losses": losses, "norms": norms, "state": state, "dp": (rt.dp_rank, rt.dp_size)}


def run_all(combos: list[Combo]) -> dict:
    out = {}
    for combo in combos:
        try:
            out[combo_id(combo)] = train_through_facade(*combo)
        except Exception:  # noqa: BLE001 - reported per combination by the test
            out[combo_id(combo)] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def world2(dist_pool):
    return dist_pool.run(run_all, WORLD2, world_size=2, timeout=300)


@pytest.fixture(scope="module")
def world4(dist_pool):
    return dist_pool.run(run_all, WORLD4, world_size=4, timeout=300)


def truth(name: str) -> tuple:
    if name == "tiny_dit":
        return tiny_dit.reference(STEPS, GLOBAL_BATCH)
    return diffusers_models.reference(name, STEPS, GLOBAL_BATCH)


@pytest.mark.parametrize("combo", WORLD2, ids=combo_id)
def test_tp2_alone_trains_like_one_process(world2, combo):
    assert_trains_like_one_process(world2, combo_id(combo), truth(combo[0]))


@pytest.mark.parametrize("combo", WORLD4, ids=combo_id)
def test_tp2_with_zero_dp2_trains_like_one_process(world4, combo):
    per_rank = world4
    assert [r[combo_id(combo)]["dp"] for r in per_rank] == [
        (0, 2),
        (0, 2),
        (1, 2),
        (1, 2),
    ]  # TP peers share data
    # one loss per dp rank: the mean over ranks is the mean over dp ranks, each counted tp times
    assert_trains_like_one_process(per_rank, combo_id(combo), truth(combo[0]))


def ema_of_three_steps(cfg: dict) -> dict[str, torch.Tensor]:
    gen = LiteGen({**cfg, "global_seed": 0, "global_batch_size": GLOBAL_BATCH, "ema": {"enable": True}})
    rt = gen.runtime
    model, opt, batches = model_and_batches("tiny_dit", rt.dp_rank, rt.dp_size)
    model, opt = gen.initialize(model, opt)
    for step, batch in enumerate(batches):
        train_steps("tiny_dit", model, opt, [batch], gen)
        gen.ema.update(step)
    state = gen.ema.full_state_dict()
    gen.close()
    return state


def test_sharded_ema_under_tp_equals_zero3s(dist_pool):
    tp = dist_pool.run(ema_of_three_steps, {"tp_size": 2, "zero_degree": 3}, world_size=4, timeout=120)[0]
    zero3 = dist_pool.run(ema_of_three_steps, {"zero_degree": 3}, world_size=4, timeout=120)[0]
    assert set(tp) == set(zero3) and tp
    for name, value in zero3.items():
        torch.testing.assert_close(tp[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def train_around_a_checkpoint(root: str, cfg: dict, phase: str) -> dict:
    """``save``: two steps, then a checkpoint; ``resume``: load it, then the third step."""
    full = {**cfg, "global_seed": 0, "global_batch_size": GLOBAL_BATCH, "checkpoint_dir": root}
    gen = LiteGen({**full, "auto_resume": phase == "resume"})
    rt = gen.runtime
    model, opt, batches = model_and_batches("tiny_dit", rt.dp_rank, rt.dp_size)
    model, opt = gen.initialize(model, opt)
    if phase == "save":
        losses, norms = train_steps("tiny_dit", model, opt, batches[:2], gen)
        gen.save(2)
    else:
        assert gen.start_step == 2
        losses, norms = train_steps("tiny_dit", model, opt, batches[2:], gen)
    state = gen.full_state_dict()
    gen.close()
    return {"losses": losses, "norms": norms, "state": state}


@pytest.mark.parametrize(
    "saved, resumed",
    [((4, {"tp_size": 2}), (2, {"tp_size": 1})), ((2, {"tp_size": 1}), (4, {"tp_size": 2}))],
    ids=["tp2xdp2-to-tp1xdp2", "tp1xdp2-to-tp2xdp2"],
)
def test_checkpoint_reshards_between_tp_sizes(dist_pool, tmp_path, saved, resumed):
    (world_a, cfg_a), (world_b, cfg_b) = saved, resumed
    first = dist_pool.run(
        train_around_a_checkpoint, str(tmp_path), {**cfg_a, "zero_degree": 3}, "save", world_size=world_a
    )
    second = dist_pool.run(
        train_around_a_checkpoint, str(tmp_path), {**cfg_b, "zero_degree": 3}, "resume", world_size=world_b
    )
    ref_losses, ref_norms, ref_state = tiny_dit.reference(STEPS, GLOBAL_BATCH)
    losses = torch.tensor([r["losses"] for r in first]).mean(0).tolist()
    losses += torch.tensor([r["losses"] for r in second]).mean(0).tolist()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for a, b in zip(first, second, strict=False):
        torch.testing.assert_close(
            torch.tensor(a["norms"] + b["norms"]), torch.tensor(ref_norms), rtol=1e-5, atol=1e-7
        )
    for name, ref in ref_state.items():
        torch.testing.assert_close(
            second[0]["state"][name], ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def facade_errors() -> list:
    """Each bad layout's ValueError; a last all-reduce proves no rank was left inside a collective."""
    cases = [
        ({"tp_size": 2, "zero_degree": 3}, "flux", {"heads": 3}),
        ({"tp_size": 2, "zero_degree": 3}, "wan", {}),  # its QK-norm spans all heads
        ({"tp_size": 2, "sp_size": 2, "zero_degree": 3}, "flux", {}),
        ({"tp_size": 2}, "flux", {}),
        ({"tp_size": 4, "zero_degree": 3}, "flux", {}),
    ]
    errors = []
    for cfg, name, overrides in cases:
        try:
            with LiteGen(cfg) as gen:
                gen.initialize(*diffusers_models.make_model_and_optimizer(name, **overrides))
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    t = torch.ones(1)
    dist.all_reduce(t)
    return [*errors, t.item()]


def test_bad_layouts_fail_clearly_on_every_rank(dist_pool):
    results = dist_pool.run(facade_errors, world_size=2, timeout=120)
    assert results[0] == results[1]
    heads, across_heads, with_sp, with_ddp, world, total = results[0]
    assert total == 2.0
    assert "transformer_blocks.0.attn (FluxAttention) has heads=3, not divisible by tp_size=2" in heads
    assert "blocks.0.attn1.norm_q (RMSNorm) normalizes 32 features, all heads at once" in across_heads
    assert "tp_size=2" in with_sp and "sp_size=2" in with_sp
    assert "tp_size=2" in with_ddp and "zero_degree=0" in with_ddp
    assert "tp_size=4" in world and "world size 2" in world


def test_tp_size_must_divide_the_node_and_leave_out_grouped_zero(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"tp_size=4 .*node size LOCAL_WORLD_SIZE=2"):
        check_world(LiteGenConfig(tp_size=4, zero_degree=3), 8)
    check_world(LiteGenConfig(tp_size=2, zero_degree=3), 8)
    with pytest.raises(ValueError, match=r"tp_size=2 .*group_zero=2"):
        LiteGenConfig(tp_size=2, zero_degree=3, group_zero=2)
