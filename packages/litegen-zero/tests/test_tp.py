"""tensor_parallel: a small transformer at tp 2 (world 2) and tp 2 x FSDP2 dp 2 (world 4, 2-D mesh) trains
three AdamW steps like one process (losses, clipped global gradient norms, weights: fp32, 1e-5); bad
input fails with the same ValueError on every rank before any collective."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from litegen_zero import clip_grad_norm_, full_state_dict, shard, tensor_parallel
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


def train_tp(dp: int) -> dict:
    """tp 2 alone (dp 1), or tp 2 x FSDP2 ZeRO-3 over dp on a ("dp", "tp") mesh."""
    mesh = init_device_mesh("cpu", (dp, 2), mesh_dim_names=("dp", "tp"))
    model, opt = make()
    tensor_parallel(model, mesh["tp"], optimizer=opt)
    heads = model.blocks[0].attn.heads
    if dp > 1:
        model, opt = shard(model, opt, degree=3, mesh=mesh["dp"])
    losses, norms = train(model, opt, mesh.get_local_rank("dp"), dp)
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


def test_tp2_alone_trains_like_one_process(dist_pool):
    check(dist_pool.run(train_tp, 1, world_size=2))


def test_tp2_with_zero3_dp2_trains_like_one_process(dist_pool):
    check(dist_pool.run(train_tp, 2, world_size=4))


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv1d(4, 4, 1)) for _ in range(2))


def bad_calls() -> list[str]:
    mesh = init_device_mesh("cpu", (2,))
    calls = [
        lambda: tensor_parallel(Net(heads=1), mesh),
        lambda: tensor_parallel(NoLinear(), mesh),
        lambda: tensor_parallel(Net(), mesh, plan={"blocks.*.attn.to_x": "colwise"}),
        lambda: tensor_parallel(Net(), mesh, plan={"blocks.*.attn.to_q": "diagonal"}),
    ]
    errors = []
    for call in calls:
        try:
            call()
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    t = torch.ones(1)
    dist.all_reduce(t)
    return [*errors, t.item()]


def test_bad_input_fails_clearly_on_every_rank(dist_pool):
    results = dist_pool.run(bad_calls, world_size=2)
    assert results[0] == results[1]
    heads, no_linear, no_match, bad_style, total = results[0]
    assert total == 2.0
    assert "blocks.0.attn (Attention) has heads=1, not divisible by tp_size=2" in heads
    assert "block 'blocks.0' (Sequential) has no linear layer the plan can place" in no_linear
    assert "'blocks.*.attn.to_x' matches no nn.Linear" in no_match
    assert "'diagonal'" in bad_style
