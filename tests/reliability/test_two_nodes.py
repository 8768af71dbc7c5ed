"""Scenario 7: two torchrun launchers on one machine (``--nnodes 2``, c10d rendezvous on 127.0.0.1) run grouped
ZeRO-3 with ``group_zero: true``: LOCAL_WORLD_SIZE=2 makes each launcher's two ranks a shard group (a "node"),
replicated across the two; the result equals one launcher of 4 (ZeRO-3 over the 4 ranks), to fp32 precision."""

from __future__ import annotations

import json

import torch
from reliability_launch import free_port, progress
from safetensors.torch import load_file

ARGS = (
    "--steps",
    "6",
    "--config",
    json.dumps({"zero_degree": 3, "group_zero": True, "global_batch_size": 8}),
)


def test_two_launchers_of_two_equal_one_launcher_of_four(tmp_path, launch):
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"
    port = free_port()
    nodes = [
        launch(two_nodes, *ARGS, nnodes=2, node_rank=n, port=port, log_name=f"node{n}.log") for n in (0, 1)
    ]
    for node in nodes:
        assert node.wait(300) == 0, node.tail()
    single = launch(one_node, *ARGS, nproc=4)
    assert single.wait(300) == 0, single.tail()

    assert {r: p["shard_group"] for r, p in progress(two_nodes).items()} == {
        0: [0, 1],
        1: [0, 1],
        2: [2, 3],
        3: [2, 3],
    }  # a shard group per launcher
    assert all(p["shard_group"] == [0, 1, 2, 3] for p in progress(one_node).values())
    grouped, flat = load_file(two_nodes / "final.safetensors"), load_file(one_node / "final.safetensors")
    assert grouped.keys() == flat.keys()
    for (
        key
    ) in flat:  # same math, another reduction order: HSDP reduce-scatter + all-reduce vs one reduce-scatter
        torch.testing.assert_close(grouped[key], flat[key], rtol=1e-5, atol=1e-6, msg=key)
