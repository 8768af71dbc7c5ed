"""Sequence parallelism through the facade on real, unmodified diffusers transformers.

PixArt (cross-attention, text padding mask), Wan (rotary table inside attention, cross-attention),
Flux (joint attention text first, dual- then single-stream blocks, rotary table over text and image),
SD3 (joint attention image first), CogVideoX (joint attention text first, rotary table of the video
tokens), Flux2 (text and image joined between the stacks) and HunyuanVideo (joint key mask, image
first; a text refiner's blocks left whole) at SP 2; Flux and Wan also at SP 4 and at DP 2 x SP 2 with
ZeRO-3 and selective checkpointing. Ulysses x Ring: Flux and Wan with 3 heads at SP 2 (ring only) and
with 6 heads at SP 4 (2 x 2) with ZeRO-3. Three AdamW steps match one process: losses, global gradient
norms and final weights (fp32, 1e-5). Sana (linear attention, a convolution over the image) is refused,
and so is a ring degree that leaves a Ulysses degree the heads do not divide.
"""

from __future__ import annotations

import traceback

import pytest
from diffusers_models import MODELS, make_batches, make_model_and_optimizer, reference, rows, train_steps
from litegen import LiteGen
from tiny_dit import assert_trains_like_one_process

STEPS, GLOBAL_BATCH = 3, 4
Combo = tuple[str, dict, dict]  # model name, LiteGen config, model constructor overrides
WORLD2: list[Combo] = [(name, {"sp_size": 2}, {}) for name in MODELS]
WORLD2 += [(name, {"sp_size": 2}, {"heads": 3}) for name in ("flux", "wan")]
WORLD4: list[Combo] = [
    (name, cfg, {})
    for name in ("flux", "wan")
    for cfg in ({"sp_size": 4}, {"sp_size": 2, "zero_degree": 3, "selective_ratio": 0.5})
]
WORLD4 += [(name, {"sp_size": 4, "zero_degree": 3}, {"heads": 6}) for name in ("flux", "wan")]


def combo_id(combo: Combo) -> str:
    name, cfg, model_config = combo
    return "-".join([name, *(f"{k}{v}" for k, v in {**cfg, **model_config}.items())])


def train_through_facade(name: str, cfg: dict, model_config: dict) -> dict:
    gen = LiteGen({**cfg, "global_seed": 0})
    model, opt = gen.initialize(*make_model_and_optimizer(name, **model_config))
    rt = gen.runtime
    per = GLOBAL_BATCH // rt.dp_size
    batches = [
        rows(b, rt.dp_rank * per, (rt.dp_rank + 1) * per, GLOBAL_BATCH)
        for b in make_batches(name, GLOBAL_BATCH, STEPS)
    ]
    losses, norms = train_steps(model, opt, batches, lambda m: gen.clip_grad_norm_(1e9))
    state = gen.full_state_dict()
    gen.close()
    return {"losses": losses, "norms": norms, "state": state}


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


def build_models(names: list[str]) -> None:
    """Rank-local, no collective: each model built once, so that no rank of the next call is still importing
    diffusers' lazy modules while the others wait in its first collective (30 s gloo timeout in test worlds)."""
    for name in names:
        make_model_and_optimizer(name)


@pytest.fixture(scope="module")
def world4(dist_pool):
    # ranks 0 and 1 are warm from world2's call, ranks 2 and 3 are not: on a loaded machine that skew alone
    # outlasted the gloo timeout
    dist_pool.run(build_models, sorted({name for name, _, _ in WORLD4}), world_size=4, timeout=300)
    return dist_pool.run(run_all, WORLD4, world_size=4, timeout=300)


def check(per_rank: list[dict], combo: Combo) -> None:
    truth = reference(combo[0], STEPS, GLOBAL_BATCH, **combo[2])
    assert_trains_like_one_process(per_rank, combo_id(combo), truth)


@pytest.mark.parametrize("combo", WORLD2, ids=combo_id)
def test_world2_matches_single_process(world2, combo):
    check(world2, combo)


@pytest.mark.parametrize("combo", WORLD4, ids=combo_id)
def test_world4_matches_single_process(world4, combo):
    check(world4, combo)


def refused(name: str, cfg: dict, model_config: dict) -> str:
    gen = LiteGen({**cfg, "global_seed": 0})
    model, _ = gen.initialize(*make_model_and_optimizer(name, **model_config))
    try:
        model(**make_batches(name, 2, 1)[0])
    except ValueError as error:
        return str(error)
    finally:
        gen.close()
    return "no error"


def test_a_block_sp_cannot_split_is_refused_by_name(dist_pool):
    for message in dist_pool.run(refused, "sana", {"sp_size": 2}, {}, world_size=2):
        assert "block 'transformer_blocks.0' (SanaTransformerBlock)" in message, message
        assert "SP cannot split this block" in message, message


def test_a_ring_degree_the_heads_do_not_allow_lists_the_splits_that_work(dist_pool):
    for message in dist_pool.run(refused, "flux", {"sp_size": 4, "sp_ring": 1}, {"heads": 6}, world_size=4):
        assert "sp_ring=1 with sp_size=4 and attention of 6 heads" in message, message
        assert "valid Ulysses x Ring splits: 2 x 2 (sp_ring=2), 1 x 4 (sp_ring=4)" in message, message
