"""Every CUDA-only branch of LiteGen, each against the result without the feature (or on the CPU).

Run on a GPU host by ``tools/gpu_check.sh`` (``pytest -m cuda tests/test_cuda.py``); skipped without CUDA. A world of
one is a single-process ``cuda:nccl,cpu:gloo`` group on a ``HashStore``, destroyed after each test (the facade makes
and destroys its own). Importable without diffusers or hypothesis.

Branches: activation offload (side streams, prefetch; with and without checkpointing), pinned ``CPUOffloadPolicy``,
``litegen_sp.attention``'s kernel choice and ring attention's log-sum-exp kernels (flash / efficient, with bias),
compiled encode and compiled blocks, bf16 FSDP2 and fp16 loss scaling through the facade, checkpoints between CPU
and CUDA tensors (sync, async with pinned staging, the facade's resume), meta-device models materialised on CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import litegen_vae
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from litegen import LiteGen
from litegen.activations import apply_activation_offload
from litegen.meta_init import materialize_meta
from litegen_ckpt import Checkpointer
from litegen_sp import SequenceInfo, attention, ulysses_attention
from litegen_sp.ring import Chunk, ring_attention_chunks
from torch import nn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (run tools/gpu_check.sh there)"
    ),
]

CUDA = torch.device("cuda", 0)
SEED = 3


# ----------------------------------------------------------------------------- a small transformer and helpers


class Block(nn.Module):
    """Pre-norm self-attention and MLP; x: (batch, seq, dim)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).transpose(1, 3).unbind(2)
        o = F.scaled_dot_product_attention(q, k, v)  # (b, heads, s, head_dim)
        x = x + self.out(o.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """Embedding, repeated blocks, head: (batch, seq, channels) -> (batch, seq, channels).

    Every module holding parameters has ``reset_parameters()``, so a meta-device build needs no weights file.
    """

    def __init__(self, dim: int = 64, depth: int = 3, heads: int = 4, channels: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def batches(count: int, batch: int = 4, seq: int = 32, channels: int = 8) -> list[tuple[torch.Tensor, ...]]:
    """``count`` (x, target) pairs on CUDA, drawn on the CPU from a fixed generator."""
    gen = torch.Generator().manual_seed(SEED)
    return [
        tuple(torch.randn(batch, seq, channels, generator=gen).to(CUDA) for _ in range(2))
        for _ in range(count)
    ]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` over all elements, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def weights(gen: LiteGen) -> dict[str, torch.Tensor]:
    """A copy of the trained model's consolidated weights (``full_state_dict`` may hand out the live tensors)."""
    return {name: value.detach().cpu().clone() for name, value in gen.full_state_dict().items()}


@contextlib.contextmanager
def facade(config: dict) -> Iterator[LiteGen]:
    """``LiteGen(config)`` on the GPU (a world of one), closed and its process group gone afterwards."""
    gen = LiteGen({"log_level": "WARNING", "global_seed": SEED, **config})
    try:
        yield gen
    finally:
        gen.close()
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture
def world_one() -> Iterator[None]:
    """A single-process ``cuda:nccl,cpu:gloo`` world, destroyed after the test."""
    torch.cuda.set_device(CUDA)
    dist.init_process_group("cuda:nccl,cpu:gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train(
    gen: LiteGen, model: nn.Module, data: list[tuple[torch.Tensor, ...]], max_norm: float | None = None
) -> tuple[list[float], list[bool]]:
    """One facade step per batch (autocast, scaled backward, skipping step); returns the losses and step results."""
    losses, stepped = [], []
    for x, target in data:
        with gen.autocast():
            out = model(x)
        loss = F.mse_loss(out.float(), target)
        gen.backward(loss)
        if max_norm is not None:
            gen.clip_grad_norm_(max_norm)
        stepped.append(gen.step())
        losses.append(loss.item())
    return losses, stepped


# ----------------------------------------------------------------------------- activation offload


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_activation_offload_gives_the_gradients_of_no_offload(autocast):
    """Side-stream copies to pinned memory and the one-block-ahead prefetch: the same gradients, less device memory
    held after the forward. In fp32 SDPA runs its efficient kernel, under bf16 autocast its flash kernel (whose
    saved tensors come back contiguous from the host)."""
    torch.manual_seed(SEED)
    reference = Stack(dim=128, depth=4).to(CUDA)  # saved tensors of (2, 4096, 128+): >= 2 MiB, offloaded
    model = copy.deepcopy(reference)
    offload = apply_activation_offload(model, list(model.blocks), CUDA)
    tolerance = 1e-2 if autocast else 1e-5  # bf16: two runs of nondeterministic kernels (atomics in backward)
    for x, target in batches(2, batch=2, seq=4096):  # two steps: the second starts from a reset offload state
        held = {}
        for name, net in (("plain", reference), ("offloaded", model)):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = F.mse_loss(net(x).float(), target)
            torch.cuda.synchronize()
            held[name] = torch.cuda.memory_allocated() - before
            if net is model:
                host = [t for group in offload.groups for t in group]
                assert host and all(t.device.type == "cpu" and t.is_pinned() for t in host), (
                    "nothing offloaded"
                )
            loss.backward()
        assert held["offloaded"] < 0.7 * held["plain"], held
        for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert rel_error(got.grad, want.grad) <= tolerance, name
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)


@pytest.mark.parametrize("selective_ratio", [0.0, 0.5], ids=["full-checkpointing", "half-checkpointed"])
def test_checkpointing_with_offload_trains_like_neither(selective_ratio):
    """``ac_offload`` with activation checkpointing through the facade (the checkpoints' saved inputs and the
    other blocks' activations go to the host): the plain losses and weights, less device memory after forward."""
    data = batches(3, batch=2, seq=2048)
    runs = {}
    for config in ({}, {"selective_ratio": selective_ratio, "ac_offload": True}):
        with facade(config) as gen:
            model = Stack(dim=128, depth=4)
            model, _ = gen.initialize(model, torch.optim.SGD(model.parameters(), lr=0.05))
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            first = F.mse_loss(model(data[0][0]), data[0][1])
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - before
            gen.backward(first)
            gen.step()
            losses, _ = train(gen, model, data[1:])
            runs[bool(config)] = ([first.item(), *losses], held, weights(gen))
    assert runs[True][1] < 0.7 * runs[False][1], (runs[True][1], runs[False][1])
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, value in runs[False][2].items():
        assert rel_error(runs[True][2][name], value) <= 1e-5, name


# ----------------------------------------------------------------------------- sharding, precision


def test_pinned_cpu_offload_policy_trains_like_no_offload():
    """ZeRO-3 with ``cpu_offload`` (FSDP2 ``CPUOffloadPolicy(pin_memory=True)``): shards in pinned host memory,
    the same losses and weights as ZeRO-3 on the GPU."""
    data = batches(3)
    runs = {}
    for offload in (False, True):
        with facade({"zero_degree": 3, "cpu_offload": offload}) as gen:
            model = Stack()
            model, _ = gen.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
            shards = [local(p) for p in model.parameters()]
            if offload:
                assert all(s.device.type == "cpu" and s.is_pinned() for s in shards)
            else:
                assert all(s.device == CUDA for s in shards)
            losses, _ = train(gen, model, data)
            runs[offload] = (losses, weights(gen))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, value in runs[False][1].items():
        assert rel_error(runs[True][1][name], value) <= 1e-5, name


def test_bf16_fsdp2_at_world_one_matches_a_bf16_copy_with_fp32_master_weights():
    """``precision: bf16`` at ZeRO-3: the forward and backward of a bf16 copy, an SGD step on fp32 master weights."""
    data = batches(3)
    lr = 0.05
    with facade({"zero_degree": 3, "precision": "bf16"}) as gen:
        model = Stack()
        master = copy.deepcopy(model).to(CUDA)
        model, _ = gen.initialize(model, torch.optim.SGD(model.parameters(), lr=lr))
        assert all(local(p).dtype == torch.float32 and local(p).device == CUDA for p in model.parameters())
        losses, _ = train(gen, model, data)
        state = weights(gen)
    expected = []
    for x, target in data:
        low = copy.deepcopy(master).to(torch.bfloat16)
        loss = F.mse_loss(low(x.to(torch.bfloat16)).float(), target)
        loss.backward()
        with torch.no_grad():
            for p, q in zip(master.parameters(), low.parameters(), strict=True):
                p -= lr * q.grad.float()
        expected.append(loss.item())
    assert losses == pytest.approx(expected, rel=1e-3)
    for name, value in master.state_dict().items():
        assert rel_error(state[name], value) <= 1e-3, name


@pytest.mark.parametrize("degree", [0, 3])
def test_fp16_loss_scaling_skips_an_overflow_and_trains(degree):
    """``precision: fp16``: autocast + ``GradScaler`` (degree 0) or FSDP2 fp16 + ``ShardedGradScaler`` (degree 3).

    An infinite loss skips the step (weights unchanged, scale halved); then training lowers the loss."""
    x, target = batches(1)[0]
    with facade({"zero_degree": degree, "precision": "fp16"}) as gen:
        model = Stack()
        model, _ = gen.initialize(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
        before = {n: local(p).detach().clone() for n, p in model.named_parameters()}
        scale = gen.loss_scale
        with gen.autocast():
            out = model(x)
        gen.backward(F.mse_loss(out.float(), target) * float("inf"))
        gen.clip_grad_norm_(1.0)
        assert gen.step() is False
        assert gen.skipped_steps == 1 and gen.loss_scale == scale / 2
        for name, param in model.named_parameters():
            assert torch.equal(local(param), before[name]), name
        losses, stepped = train(gen, model, [(x, target)] * 30, max_norm=1.0)
    assert all(stepped[5:]), stepped  # the scale settles within a few steps
    assert losses[-1] < 0.7 * losses[0], losses


def test_fp16_autocast_and_scaler_match_torch_alone():
    """Degree 0, fp16: the facade's steps are torch's ``autocast`` + ``GradScaler`` loop on the same model."""
    data = batches(4)
    with facade({"precision": "fp16"}) as gen:
        model = Stack()
        reference = copy.deepcopy(model).to(CUDA)
        model, _ = gen.initialize(model, torch.optim.SGD(model.parameters(), lr=0.05))
        losses, _ = train(gen, model, data)
        state = weights(gen)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cuda")
    expected = []
    for x, target in data:
        with torch.autocast("cuda", dtype=torch.float16):
            out = reference(x)
        loss = F.mse_loss(out.float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        expected.append(loss.item())
    assert losses == pytest.approx(expected, rel=2e-3)
    for name, value in reference.state_dict().items():
        assert rel_error(state[name], value) <= 2e-3, name


def test_compiled_blocks_train_like_eager_blocks():
    """``compile: true`` (``torch.compile`` per block) gives the eager losses and weights."""
    data = batches(2)
    runs = {}
    for compiled in (False, True):
        with facade({"compile": compiled}) as gen:
            model = Stack()
            model, _ = gen.initialize(model, torch.optim.SGD(model.parameters(), lr=0.05))
            losses, _ = train(gen, model, data)
            runs[compiled] = (losses, weights(gen))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    for name, value in runs[False][1].items():
        assert rel_error(runs[True][1][name], value) <= 1e-4, name


# ----------------------------------------------------------------------------- meta-device models


def reset_parameters_reference() -> dict[str, torch.Tensor]:
    """The documented rule on the CPU: each module's ``reset_parameters()`` in ``modules()`` order under the seed."""
    with torch.device("meta"):
        model = Stack()
    materialize_meta(model, torch.device("cpu"), seed=SEED, reset=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("degree", [0, 3])
def test_a_meta_model_is_materialised_on_cuda_with_the_reference_weights(degree):
    expected = reset_parameters_reference()
    with facade({"zero_degree": degree}) as gen:
        with torch.device("meta"):
            model = Stack()
        model, _ = gen.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        inner = getattr(model, "module", model)
        assert all(local(p).device == CUDA and not p.is_meta for p in inner.parameters())
        state = weights(gen)
        losses, _ = train(gen, model, batches(2))
    assert set(state) == set(expected)
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
    assert all(torch.isfinite(torch.tensor(losses)))


# ----------------------------------------------------------------------------- checkpoints


def step_once(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor
) -> None:
    F.mse_loss(model(x), target).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "saved_on, loaded_on, async_save",
    [("cpu", "cuda", False), ("cuda", "cpu", False), ("cuda", "cuda", True)],
    ids=["cpu-to-cuda", "cuda-to-cpu", "cuda-async-pinned-to-cuda"],
)
def test_a_checkpoint_moves_between_cpu_and_cuda_tensors(tmp_path, saved_on, loaded_on, async_save):
    """Model and AdamW state saved from one device load into the other bitwise (digests checked on the way), and
    the next step agrees."""
    x, target = (t.to(saved_on) for t in batches(1)[0])
    torch.manual_seed(SEED)
    saved = Stack().to(saved_on)
    saved_opt = torch.optim.AdamW(saved.parameters(), lr=1e-3)
    step_once(saved, saved_opt, x, target)
    checkpointer = Checkpointer(tmp_path, async_save=async_save)
    checkpointer.save(1, model=saved, optimizer=saved_opt)
    checkpointer.close()

    torch.manual_seed(SEED + 1)
    loaded = Stack().to(loaded_on)
    loaded_opt = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    assert Checkpointer(tmp_path).load(model=loaded, optimizer=loaded_opt) == 1
    for (name, a), b in zip(saved.named_parameters(), loaded.parameters(), strict=True):
        assert b.device.type == loaded_on and torch.equal(a.detach().cpu(), b.detach().cpu()), name
        sa, sb = saved_opt.state[a], loaded_opt.state[b]
        for key in ("exp_avg", "exp_avg_sq"):
            assert sb[key].device.type == loaded_on and torch.equal(sa[key].cpu(), sb[key].cpu()), (name, key)
        assert float(sa["step"]) == float(sb["step"])
    step_once(saved, saved_opt, x, target)
    step_once(loaded, loaded_opt, x.to(loaded_on), target.to(loaded_on))
    for (name, a), b in zip(saved.named_parameters(), loaded.parameters(), strict=True):
        assert rel_error(b, a) <= 1e-5, name


def test_the_facade_resumes_a_zero3_checkpoint_on_cuda(tmp_path):
    """Save from CUDA FSDP2 shards under the facade's NCCL world, resume into a fresh model: identical weights and
    the same next loss."""
    data = batches(3)
    with facade({"zero_degree": 3, "checkpoint_dir": str(tmp_path)}) as gen:
        model = Stack()
        model, _ = gen.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        train(gen, model, data[:2])
        gen.save(2)
        saved = weights(gen)
        expected, _ = train(gen, model, data[2:])
    with facade({"zero_degree": 3, "checkpoint_dir": str(tmp_path), "global_seed": SEED + 1}) as gen:
        model = Stack()
        model, _ = gen.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        assert gen.resume() == 2
        state = weights(gen)
        losses, _ = train(gen, model, data[2:])
    for name, value in saved.items():
        assert torch.equal(state[name], value), name
    assert losses == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- VAE encode


def test_compiled_encode_matches_eager_and_does_not_fall_back(caplog):
    """``litegen_vae.compiled`` (dynamic shapes) inside ``sliced``: uneven slices, a dict output, no eager fallback."""
    torch.manual_seed(SEED)
    encoder = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.SiLU(),
        nn.Conv2d(16, 8, 3, stride=2, padding=1),
    )
    encoder = encoder.to(CUDA).eval().requires_grad_(False)

    def encode(x: torch.Tensor) -> dict[str, torch.Tensor]:
        moments = encoder(x)
        mean, logvar = moments.chunk(2, dim=1)
        return {"mean": mean, "std": torch.exp(0.5 * logvar.clamp(-30.0, 20.0))}

    x = torch.randn(7, 3, 32, 32, device=CUDA)
    fast = litegen_vae.sliced(litegen_vae.compiled(encode), 3)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = (
        False  # eager and compiled convolutions may pick other layouts / algorithms
    )
    try:
        with caplog.at_level(logging.WARNING), torch.no_grad():
            got, expected = fast(x), encode(x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert not [r for r in caplog.records if "eagerly" in r.getMessage()], caplog.text
    for key in expected:
        assert got[key].device == CUDA and rel_error(got[key], expected[key]) <= 1e-4, key


# ----------------------------------------------------------------------------- attention kernels


def reference_attention(q, k, v, *, causal=False, mask=None, scale=None) -> torch.Tensor:
    """Attention in float64 on the CPU; q ``(b, s, h, d)``, k/v ``(b, s_kv, h_kv, d)``, mask bool (True: attend)."""
    q, k, v = (t.double().cpu().transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask.cpu(), float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # a query with no key: zero output, as the kernels
    return (probs @ v).transpose(1, 2)


TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def check_against_reference(run, q, k, v, dtype, *, real=None, **reference_kwargs) -> None:
    """``run(q, k, v)`` on CUDA in ``dtype`` vs ``reference_attention`` in float64 over the real tokens (indices
    ``real`` along the sequence; default all): outputs and q/k/v gradients, zero at the pad tokens."""
    leaves = [t.to(CUDA, dtype, copy=True).requires_grad_() for t in (q, k, v)]
    out = run(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(SEED))
    out.backward(grad.to(CUDA, dtype))
    double = [t.detach().double().requires_grad_() for t in (q, k, v)]
    keep = slice(None) if real is None else real
    expected = reference_attention(*(t[:, keep] for t in double), **reference_kwargs)
    expected.backward(grad[:, keep].double())
    full = torch.zeros(out.shape, dtype=torch.float64)
    full[:, keep] = expected.detach()
    assert rel_error(out, full) <= TOLERANCE[dtype], ("output", rel_error(out, full))
    for name, got, want in zip("qkv", leaves, double, strict=True):
        assert rel_error(got.grad, want.grad) <= TOLERANCE[dtype], (name, rel_error(got.grad, want.grad))


def qkv(batch=2, seq=77, heads=4, kv_heads=4, head_dim=64, kv_seq=None) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(SEED)
    q = torch.randn(batch, seq, heads, head_dim, generator=gen)
    k, v = (torch.randn(batch, kv_seq or seq, kv_heads, head_dim, generator=gen) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", ["plain", "causal", "key_mask", "gqa", "cross"])
def test_attention_kernel_choice_matches_math(dtype, case):
    """``litegen_sp.attention`` on CUDA (flash-attn when installed, else SDPA's flash / efficient / cuDNN kernels)."""
    q, k, v = qkv(kv_heads=2 if case == "gqa" else 4, kv_seq=50 if case == "cross" else None)
    mask = None
    if case == "key_mask":
        mask = torch.rand(q.shape[0], 1, 1, k.shape[1], generator=torch.Generator().manual_seed(1)) > 0.3
    causal = case == "causal"

    def run(q, k, v):
        return attention(q, k, v, causal=causal, attn_mask=None if mask is None else mask.to(CUDA))

    check_against_reference(run, q, k, v, dtype, causal=causal, mask=mask)


def test_the_flash_attn_package_branch_matches_math():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed: attention() uses SDPA")
    check_against_reference(lambda q, k, v: attention(q, k, v), *qkv(), torch.bfloat16)


def test_ulysses_attention_on_a_world_of_one_drops_pads_and_masks_keys(world_one):
    """Joint text + image attention (each padded) with a text mask through ``ulysses_attention`` on CUDA tensors."""
    text, image = SequenceInfo(9, 12, 1, 1), SequenceInfo(70, 72, 1, 1)
    q, k, v = qkv(seq=12 + 72)
    key_mask = torch.ones(q.shape[0], 1, 1, 12 + 72, dtype=torch.bool)
    key_mask[0, ..., 5:12] = False  # the first sample's text is 5 tokens long
    real = torch.cat([torch.arange(9), torch.arange(12, 12 + 70)])

    def run(q, k, v):
        return ulysses_attention(
            q, k, v, group=dist.group.WORLD, seq_len=[text, image], attn_mask=key_mask.to(CUDA)
        )

    check_against_reference(run, q, k, v, torch.bfloat16, real=real, mask=key_mask[..., real])


@pytest.mark.parametrize(
    "dtype, real, mask",
    [
        (torch.bfloat16, 80, None),  # flash with log-sum-exp
        (torch.float16, 67, None),  # flash, pad tokens dropped
        (torch.float32, 80, None),  # efficient with log-sum-exp
        (torch.float32, 67, None),  # efficient, a query count that is no multiple of 8
        (torch.bfloat16, 80, "key"),  # efficient with a per-key bias
        (torch.bfloat16, 67, "key"),
        (torch.float32, 67, "whole"),  # efficient with rows of a whole query x key mask
    ],
)
def test_ring_attention_kernels_match_math(world_one, dtype, real, mask):
    """Ring attention's chunk kernels and their backward from the merged output and log-sum-exp, on a ring of one
    (``ring._kernel`` / ``_kernel_backward``: flash or efficient, per-key or whole-mask bias), with pads and GQA.

    Last in the file: a kernel that fails may leave the CUDA context unusable for the tests after it."""
    seq = 80
    q, k, v = qkv(seq=seq, heads=4, kv_heads=2)
    real_index = torch.arange(real)
    chunk = Chunk(
        real_index.to(CUDA) if real < seq else None, real_index.to(CUDA) if mask == "whole" else None, real
    )
    gen = torch.Generator().manual_seed(2)
    key_mask = torch.rand(q.shape[0], 1, 1, seq, generator=gen) > 0.3 if mask == "key" else None
    whole = torch.rand(q.shape[0], 1, real, real, generator=gen) > 0.3 if mask == "whole" else None

    def run(q, k, v):
        return ring_attention_chunks(
            q, k, v, group=dist.group.WORLD, q_chunk=chunk, kv_chunks=[chunk],
            key_mask=None if key_mask is None else key_mask.to(CUDA),
            whole_mask=None if whole is None else whole.to(CUDA),
        )  # fmt: skip

    reference_mask = key_mask[..., :real] if key_mask is not None else whole
    check_against_reference(run, q, k, v, dtype, real=real_index, mask=reference_mask)
