"""tensor_parallel: a small transformer at tp 2 (world 2) trains three AdamW steps like one process (losses,
clipped global gradient norms, weights: fp32, 1e-5); tiny frozen text encoders of transformers' classes (T5 with
its relative position bias, gated T5, CLIP, BERT as in MiniLM) found by structure give the unsplit encoder's
output at tp 2; bad input fails with the same ValueError on every rank before any collective. All in one
world-2 harness call. tp 2 x FSDP2 dp 2 (world 4: ``tensor_parallel`` over a 2-D mesh's tp dim, ``shard`` over
its dp dim, ``clip_grad_norm_`` and ``full_state_dict`` across both) is tested through the facade
(``packages/litegen/tests/test_tp.py``), which makes exactly these calls.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bad_input import refusals
from litegen_zero import clip_grad_norm_, full_state_dict, tensor_parallel
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

DIM, HEADS, TOKENS, BATCH, STEPS = 16, 4, 7, 4, 3


class Attention(nn.Module):
    def __init__(self, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.norm_q = nn.LayerNorm(DIM // heads)  # a QK-norm over head_dim, on this rank's heads
        self.to_out = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, s, DIM) -> (b, s, DIM)."""
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(self.norm_q(q), k, v)
        return self.to_out(o.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, heads: int = HEADS) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = Attention(heads)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self, heads: int = HEADS) -> None:
        super().__init__()
        self.embed = nn.Linear(3, DIM)
        self.blocks = nn.ModuleList(Block(heads) for _ in range(2))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, TOKENS, 3) -> (b, TOKENS, 3)."""
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def train(model: nn.Module, opt: torch.optim.Optimizer, dp_rank: int, dp_size: int) -> tuple[list, list]:
    losses, norms = [], []
    per = BATCH // dp_size
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x, target = torch.randn(BATCH, TOKENS, 3, generator=g), torch.randn(BATCH, TOKENS, 3, generator=g)
        rows = slice(dp_rank * per, (dp_rank + 1) * per)
        loss = F.mse_loss(model(x[rows]), target[rows])
        loss.backward()
        norms.append(float(clip_grad_norm_(model, 1e9)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, norms


def make() -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_tp() -> dict:
    """tp 2 alone, over a 1-D mesh."""
    model, opt = make()
    tensor_parallel(model, init_device_mesh("cpu", (2,)), optimizer=opt)
    heads = model.blocks[0].attn.heads
    losses, norms = train(model, opt, 0, 1)
    return {"losses": losses, "norms": norms, "state": full_state_dict(model), "heads": heads}


def check(per_rank: list[dict]) -> None:
    model, opt = make()
    losses, norms = train(model, opt, 0, 1)
    for rank in per_rank:
        assert rank["heads"] == HEADS // 2
        torch.testing.assert_close(torch.tensor(rank["norms"]), torch.tensor(norms), rtol=1e-5, atol=1e-7)
    mean = torch.tensor([r["losses"] for r in per_rank]).mean(0)  # TP peers hold equal losses
    torch.testing.assert_close(mean, torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(per_rank[0]["state"][name], value, rtol=1e-5, atol=1e-6)


def test_tp2_alone_trains_like_one_process(world2):
    check([rank["train"] for rank in world2])


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv1d(4, 4, 1)) for _ in range(2))


def tiny_encoders() -> dict[str, nn.Module]:
    """Seeded tiny encoders of transformers' classes: 4 heads of 4, width 16, hidden 24, 2 layers, 50 tokens."""
    transformers = pytest.importorskip("transformers")
    size = {"vocab_size": 50, "num_hidden_layers": 2, "intermediate_size": 24, "max_position_embeddings": 16}
    t5 = {"vocab_size": 50, "d_model": 16, "d_kv": 4, "num_heads": 4, "d_ff": 24, "num_layers": 2}
    configs = {
        "t5": (transformers.T5EncoderModel, transformers.T5Config(**t5)),
        "t5_gated": (
            transformers.T5EncoderModel,
            transformers.T5Config(**t5, feed_forward_proj="gated-gelu"),
        ),
        "clip": (
            transformers.CLIPTextModel,
            transformers.CLIPTextConfig(**size, hidden_size=16, num_attention_heads=4, eos_token_id=2),
        ),
        "bert": (
            transformers.BertModel,
            transformers.BertConfig(**size, hidden_size=16, num_attention_heads=4),
        ),
    }
    encoders = {}
    for name, (cls, config) in configs.items():
        torch.manual_seed(0)
        encoders[name] = cls(config).eval().requires_grad_(False)
    return encoders


def encoder_inputs() -> dict[str, torch.Tensor]:
    """Two prompts of 7 tokens, the second padded by 2: ``input_ids``, ``attention_mask`` (2, 7)."""
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def encode_tp() -> dict[str, dict]:
    """Each encoder split by structure over tp 2: its last hidden state, grad-free, and its local head counts."""
    mesh = init_device_mesh("cpu", (2,))
    out = {}
    for name, encoder in tiny_encoders().items():
        tensor_parallel(encoder, mesh)
        with torch.no_grad():
            hidden = encoder(**encoder_inputs()).last_hidden_state
        heads = {
            n: [
                getattr(m, a)
                for a in ("n_heads", "num_heads", "num_attention_heads", "inner_dim", "all_head_size")
                if hasattr(m, a)
            ]
            for n, m in encoder.named_modules()
            if type(m).__name__ in ("T5Attention", "CLIPAttention", "BertSelfAttention")
        }
        grads = any(p.requires_grad for p in encoder.parameters())
        out[name] = {"hidden": hidden, "heads": heads, "grads": grads}
    return out


def bad_calls() -> list[str]:
    mesh = init_device_mesh("cpu", (2,))
    transformers = pytest.importorskip("transformers")
    t5 = transformers.T5Config(vocab_size=50, d_model=12, d_kv=4, num_heads=3, d_ff=24, num_layers=1)
    calls = [
        lambda: tensor_parallel(Net(heads=1), mesh),
        lambda: tensor_parallel(NoLinear(), mesh),
        lambda: tensor_parallel(Net(), mesh, plan={"blocks.*.attn.to_x": "colwise"}),
        lambda: tensor_parallel(Net(), mesh, plan={"blocks.*.attn.to_q": "diagonal"}),
        lambda: tensor_parallel(transformers.T5EncoderModel(t5), mesh),
    ]
    return refusals(calls)


def world2_checks() -> dict:
    """Everything at world 2 in one call: training at tp 2, the encoders at tp 2, the refusals."""
    return {"train": train_tp(), "encoders": encode_tp(), "errors": bad_calls()}


@pytest.fixture(scope="module")
def world2(dist_pool):
    pytest.importorskip("transformers")
    return dist_pool.run(world2_checks, world_size=2, timeout=120)


@pytest.mark.parametrize("name", ["t5", "t5_gated", "clip", "bert"])
def test_frozen_encoder_at_tp2_equals_the_whole_encoder(world2, name):
    with torch.no_grad():
        whole = tiny_encoders()[name](**encoder_inputs()).last_hidden_state
    for rank in world2:
        encoder = rank["encoders"][name]
        assert not encoder["grads"]
        assert encoder["heads"] and all(counts in ([2], [2, 8]) for counts in encoder["heads"].values())
        torch.testing.assert_close(encoder["hidden"], whole, rtol=1e-5, atol=1e-6)


def test_bad_input_fails_clearly_on_every_rank(world2):
    results = [rank["errors"] for rank in world2]
    assert results[0] == results[1]
    heads, no_linear, no_match, bad_style, t5_heads, total = results[0]
    assert total == 2.0
    assert "blocks.0.attn (Attention) has heads=1, not divisible by tp_size=2" in heads
    assert "block 'blocks.0' (Sequential) has no linear layer the plan can place" in no_linear
    assert "'blocks.*.attn.to_x' matches no nn.Linear" in no_match
    assert "'diagonal'" in bad_style
    assert (
        "encoder.block.0.layer.0.SelfAttention (T5Attention) has n_heads=3, not divisible by tp_size=2"
        in t5_heads
    )
