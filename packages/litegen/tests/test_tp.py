"""Tensor parallelism through the facade: ``tp_size`` 2 alone (world 2) and × ZeRO dp 2 (world 4).

The tiny DiT (found by structure), PixArt (diffusers ``Attention`` + ``FeedForward``, found by structure),
Flux (its ``_tp_plan``; the single-stream packed ``proj_out`` kept replicated), SD3 (joint attention, a
context-pre-only last block), CogVideoX and HunyuanVideo (an explicit ``tp_plan``: its single-stream blocks'
packed ``proj_out`` is not readable from the structure) train three AdamW steps like one process: losses,
global gradient norms and final weights (fp32, 1e-5). The tiny DiT also with selective checkpointing and
the sharded EMA (equal to ZeRO-3's EMA), and with a frozen tiny T5 encoder split over the TP group (and
sharded over dp with ``encoder.fsdp`` at world 4) whose output equals the whole encoder's. A checkpoint
saved at tp 2 x dp 2 resumes at tp 1 x dp 2, one saved at tp 1 x dp 4 at tp 2 x dp 2, and training
continues like one process. TP ranks share their samples. Refused on every rank before any collective:
heads not divisible by tp_size (a trainable model, a frozen encoder), Wan's QK-norm over all heads,
HunyuanVideo without a plan, TP with SP, with DDP, a tp_size that does not divide the world.

Every run happens in two harness calls (world 4, then world 2, which resumes world 4's checkpoint).
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable

import diffusers_models
import pytest
import tiny_dit
import torch
from bad_input import refusals
from diffusers.hooks.tensor_parallel import PackedRowwiseParallel
from litegen import LiteGen
from litegen.config import EncoderConfig, LiteGenConfig, check_world
from tiny_dit import assert_trains_like_one_process
from torch import nn

STEPS, GLOBAL_BATCH = 3, 4
Combo = tuple[str, dict]  # model name ("tiny_dit" or a diffusers_models name), LiteGen config
WORLD2: list[Combo] = [
    (name, {"tp_size": 2, "zero_degree": 3})
    for name in ("tiny_dit", "pixart", "flux", "sd3", "cogvideox", "hunyuan_video")
]
WORLD4: list[Combo] = [
    ("tiny_dit", {"tp_size": 2, "zero_degree": 3, "encoder": {"fsdp": True}}),
    ("pixart", {"tp_size": 2, "zero_degree": 3}),
    ("flux", {"tp_size": 2, "zero_degree": 3}),
    ("tiny_dit", {"tp_size": 2, "zero_degree": 2, "selective_ratio": 0.5}),
]
# HunyuanVideo's single-stream proj_out reads cat(attention 64, mlp 128): its layout is data, not structure
TP_PLANS = {
    "hunyuan_video": {
        "transformer_blocks.*.attn.to_[qkv]": "colwise",
        "transformer_blocks.*.attn.add_[qkv]_proj": "colwise",
        "transformer_blocks.*.attn.to_out.0": "rowwise",
        "transformer_blocks.*.attn.to_add_out": "rowwise",
        "transformer_blocks.*.ff*.net.0.proj": "colwise",
        "transformer_blocks.*.ff*.net.2": "rowwise",
        "single_transformer_blocks.*.attn.to_[qkv]": "colwise",
        "single_transformer_blocks.*.proj_mlp": "colwise",
        "single_transformer_blocks.*.proj_out": PackedRowwiseParallel([1, 2]),
    }
}


def combo_id(combo: Combo) -> str:
    flat = {
        f"{k}.{kk}" if isinstance(v, dict) else k: vv
        for k, v in combo[1].items()
        for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])
    }
    return "-".join([combo[0], *(f"{k}{v}" for k, v in flat.items())])


def tiny_t5(heads: int = 4) -> nn.Module:
    """A frozen tiny transformers T5 encoder (relative position bias over its heads), seeded."""
    import transformers

    torch.manual_seed(1)
    config = transformers.T5Config(
        vocab_size=50, d_model=4 * heads, d_kv=4, num_heads=heads, d_ff=24, num_layers=2
    )
    return transformers.T5EncoderModel(config).eval().requires_grad_(False)


def prompts() -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (2, 7): the second prompt padded by 2."""
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    return {
        "input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1)),
        "attention_mask": mask,
    }


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
    """Three steps; the tiny DiT comes with a frozen T5 encoder, whose output on ``prompts()`` is returned."""
    gen = LiteGen({**cfg, "global_seed": 0, "global_batch_size": GLOBAL_BATCH})
    rt = gen.runtime
    model, opt, batches = model_and_batches(name, rt.dp_rank, rt.dp_size)
    out = {"dp": (rt.dp_rank, rt.dp_size)}
    if name == "tiny_dit":
        model, opt, encoder = gen.initialize(model, opt, tiny_t5())
        with torch.no_grad():
            out["encoded"] = encoder(**prompts()).last_hidden_state
    else:
        model, opt = gen.initialize(model, opt, tp_plan=TP_PLANS.get(name))
    out["losses"], out["norms"] = train_steps(name, model, opt, batches, gen)
    out["state"] = gen.full_state_dict()
    gen.close()
    return out


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


def train_around_a_checkpoint(root: str, cfg: dict, phase: str) -> dict:
    """``save``: two steps, then a checkpoint in ``root``; ``resume``: load it, then the third step."""
    full = {
        **cfg,
        "zero_degree": 3,
        "global_seed": 0,
        "global_batch_size": GLOBAL_BATCH,
        "checkpoint_dir": root,
    }
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


def facade_errors() -> list:
    """Each bad layout's ValueError; a last all-reduce proves no rank was left inside a collective."""
    tp2 = {"tp_size": 2, "zero_degree": 3}
    cases: list[tuple[dict, Callable[[], tuple]]] = [
        (tp2, lambda: diffusers_models.make_model_and_optimizer("flux", heads=3)),
        (tp2, lambda: diffusers_models.make_model_and_optimizer("wan")),  # its QK-norm spans all heads
        (tp2, lambda: diffusers_models.make_model_and_optimizer("hunyuan_video")),  # no tp_plan
        (tp2, lambda: (tiny_t5(heads=3),)),
        ({**tp2, "sp_size": 2}, lambda: diffusers_models.make_model_and_optimizer("flux")),
        ({"tp_size": 2}, lambda: diffusers_models.make_model_and_optimizer("flux")),
        ({**tp2, "tp_size": 4}, lambda: diffusers_models.make_model_and_optimizer("flux")),
    ]
    return refusals([functools.partial(initialize, cfg, objects) for cfg, objects in cases])


def initialize(cfg: dict, objects: Callable[[], tuple]) -> None:
    with LiteGen(cfg) as gen:
        gen.initialize(*objects())


Job = tuple[str, Callable[..., object], tuple]  # result key, module-level function, its arguments


def run_jobs(jobs: list[Job]) -> dict:
    """Each job's result, or its traceback (reported by the test that reads it)."""
    out = {}
    for key, fn, args in jobs:
        try:
            out[key] = fn(*args)
        except Exception:  # noqa: BLE001 - reported per job by the test
            out[key] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def runs(dist_pool, tmp_path_factory) -> dict[int, list[dict]]:
    """All runs of this module in two harness calls: world 4 (its checkpoint is resumed at world 2), world 2."""
    forward, reverse = (str(tmp_path_factory.mktemp(name)) for name in ("tp2xdp2", "tp1xdp4"))
    world4: list[Job] = [(combo_id(c), train_through_facade, c) for c in WORLD4]
    world4 += [
        ("ema-tp", ema_of_three_steps, ({"tp_size": 2, "zero_degree": 3},)),
        ("ema-zero3", ema_of_three_steps, ({"zero_degree": 3},)),
        ("save-tp2xdp2", train_around_a_checkpoint, (forward, {"tp_size": 2}, "save")),
        ("save-tp1xdp4", train_around_a_checkpoint, (reverse, {"tp_size": 1}, "save")),
        ("resume-tp2xdp2", train_around_a_checkpoint, (reverse, {"tp_size": 2}, "resume")),
    ]
    world2: list[Job] = [(combo_id(c), train_through_facade, c) for c in WORLD2]
    world2 += [
        ("resume-tp1xdp2", train_around_a_checkpoint, (forward, {"tp_size": 1}, "resume")),
        ("errors", facade_errors, ()),
    ]
    return {
        4: dist_pool.run(run_jobs, world4, world_size=4, timeout=300),
        2: dist_pool.run(run_jobs, world2, world_size=2, timeout=300),
    }


def results(per_rank: list[dict], key: str) -> list:
    for rank, res in enumerate(per_rank):
        assert not isinstance(res[key], str), f"rank {rank} failed:\n{res[key]}"
    return [res[key] for res in per_rank]


@functools.cache
def truth(name: str) -> tuple:
    if name == "tiny_dit":
        return tiny_dit.reference(STEPS, GLOBAL_BATCH)
    return diffusers_models.reference(name, STEPS, GLOBAL_BATCH)


@pytest.mark.parametrize("combo", WORLD2, ids=combo_id)
def test_tp2_alone_trains_like_one_process(runs, combo):
    assert_trains_like_one_process(runs[2], combo_id(combo), truth(combo[0]))


@pytest.mark.parametrize("combo", WORLD4, ids=combo_id)
def test_tp2_with_zero_dp2_trains_like_one_process(runs, combo):
    per_rank = results(runs[4], combo_id(combo))
    assert [r["dp"] for r in per_rank] == [(0, 2), (0, 2), (1, 2), (1, 2)]  # TP peers share data
    # one loss per dp rank: the mean over ranks is the mean over dp ranks, each counted tp times
    assert_trains_like_one_process(runs[4], combo_id(combo), truth(combo[0]))


@pytest.mark.parametrize("world, combo", [(2, WORLD2[0]), (4, WORLD4[0])], ids=["tp2", "tp2xdp2-fsdp"])
def test_frozen_encoder_split_over_tp_equals_the_whole_encoder(runs, world, combo):
    with torch.no_grad():
        whole = tiny_t5()(**prompts()).last_hidden_state
    for res in results(runs[world], combo_id(combo)):
        torch.testing.assert_close(res["encoded"], whole, rtol=1e-5, atol=1e-6)


def test_sharded_ema_under_tp_equals_zero3s(runs):
    tp, zero3 = results(runs[4], "ema-tp")[0], results(runs[4], "ema-zero3")[0]
    assert set(tp) == set(zero3) and tp
    for name, value in zero3.items():
        torch.testing.assert_close(tp[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "saved, resumed",
    [((4, "save-tp2xdp2"), (2, "resume-tp1xdp2")), ((4, "save-tp1xdp4"), (4, "resume-tp2xdp2"))],
    ids=["tp2xdp2-to-tp1xdp2", "tp1xdp4-to-tp2xdp2"],
)
def test_checkpoint_reshards_between_tp_sizes(runs, saved, resumed):
    first, second = results(runs[saved[0]], saved[1]), results(runs[resumed[0]], resumed[1])
    ref_losses, ref_norms, ref_state = truth("tiny_dit")
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


def test_bad_layouts_fail_clearly_on_every_rank(runs):
    per_rank = results(runs[2], "errors")
    assert per_rank[0] == per_rank[1]
    heads, across_heads, no_plan, encoder_heads, with_sp, with_ddp, world, total = per_rank[0]
    assert total == 2.0
    assert "transformer_blocks.0.attn (FluxAttention) has heads=3, not divisible by tp_size=2" in heads
    assert "blocks.0.attn1.norm_q (RMSNorm) normalizes 32 features, all heads at once" in across_heads
    assert "block 'single_transformer_blocks.0' (HunyuanVideoSingleTransformerBlock)" in no_plan
    assert "attn has q/k/v but no output projection of its own" in no_plan and "tp_plan=" in no_plan
    assert "SelfAttention (T5Attention) has n_heads=3, not divisible by tp_size=2" in encoder_heads
    assert "encoder.tp: false" in encoder_heads
    assert "tp_size=2" in with_sp and "sp_size=2" in with_sp
    assert "tp_size=2" in with_ddp and "zero_degree=0" in with_ddp
    assert "tp_size=4" in world and "world size 2" in world


def test_tp_size_must_divide_the_node_and_leave_out_grouped_zero():
    with pytest.raises(ValueError, match=r"tp_size=4 .*node size LOCAL_WORLD_SIZE=2"):
        check_world(LiteGenConfig(tp_size=4, zero_degree=3), 8, 2)  # 8 ranks, 2 per node
    check_world(LiteGenConfig(tp_size=2, zero_degree=3), 8, 2)
    with pytest.raises(ValueError, match=r"tp_size=2 .*group_zero=2"):
        LiteGenConfig(tp_size=2, zero_degree=3, group_zero=2)
    with pytest.raises(ValueError, match=r"encoder.group=True .*tp_size=2 and encoder.tp: true"):
        LiteGenConfig(tp_size=2, zero_degree=3, encoder=EncoderConfig(fsdp=True, group=True))
    LiteGenConfig(tp_size=2, zero_degree=3, encoder=EncoderConfig(fsdp=True, group=True, tp=False))
