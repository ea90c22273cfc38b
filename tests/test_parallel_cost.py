"""The communication model: hand-checked traffic, the V3 node-limit argument, FP8, redundancy."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lib.parallel import cost, fp8


def test_traffic_of_four_tokens_checked_by_hand():
    # 2 nodes x 2 GPUs, one expert per GPU; token t comes from GPU t (see the comments for the hops)
    indices = torch.tensor([[1, 2],    # GPU0: NVLink to GPU1; IB to node 1, landing on GPU2 = expert 2
                            [2, 3],    # GPU1: IB to node 1 landing on GPU3, NVLink GPU3 -> GPU2
                            [2, 0],    # GPU2: its own expert; IB to node 0 landing on GPU0 = expert 0
                            [0, 1]])   # GPU3: IB to node 0 landing on GPU1, NVLink GPU1 -> GPU0
    cluster = cost.Cluster(nodes=2, gpus_per_node=2)
    tr = cost.traffic(indices, cluster, n_experts=4)
    assert tr.ib_out_G.tolist() == [1, 1, 1, 1] and tr.ib_in_G.tolist() == [1, 1, 1, 1]
    assert tr.nv_out_G.tolist() == [1, 1, 0, 1] and tr.nv_in_G.tolist() == [1, 1, 1, 0]
    assert (tr.nodes_per_token, tr.experts_per_node, tr.gpus_per_node) == (1.5, 1.5, 1.5)
    c = cost.comm_cost(tr, cluster, d_model=256, tokens_per_gpu=1)
    assert c.dispatch_us == pytest.approx(fp8.payload_bytes(256) / 50e9 * 1e6)
    assert c.combine_us == pytest.approx(2 * 256 / 50e9 * 1e6)
    assert c.bound == "IB"


def test_copies_are_conserved_and_the_node_limit_holds():
    for max_nodes in (None, 4, 2, 1):
        c = cost.predict(max_nodes=max_nodes, sample_per_gpu=64)
        tr = c.traffic
        assert tr.ib_out_G.sum() == tr.ib_in_G.sum() and tr.nv_out_G.sum() == tr.nv_in_G.sum()
        assert tr.gpu_load_G.sum() == tr.tokens * 8
        if max_nodes:
            assert tr.nodes_per_token <= max_nodes + 1e-9


def test_unlimited_routing_reaches_the_hypergeometric_number_of_nodes():
    """Without skew, our router's top-8 of 256 looks uniform: 8 (1 - C(224, 8) / C(256, 8)) nodes."""
    expected = cost.expected_nodes_uniform(256, 8, 8)
    assert expected == pytest.approx(8 * (1 - math.comb(224, 8) / math.comb(256, 8)))
    measured = cost.predict(max_nodes=None).traffic.nodes_per_token
    assert measured == pytest.approx(expected, rel=0.02)


def test_v3_node_limit_argument():
    """M = 4: about 2 experts per reached node, below NVLink/IB = 3.2, so IB sets the time; from
    K = 13 (4 x 3.2) on, a reached node holds more than 3.2 experts and NVLink catches up."""
    v3 = cost.predict(max_nodes=4, top_k=8)
    assert v3.traffic.experts_per_node == pytest.approx(2.0, abs=0.1) and v3.bound == "IB"
    assert v3.dispatch_us < 0.85 * cost.predict(max_nodes=None).dispatch_us
    wide = cost.predict(max_nodes=4, top_k=16)
    assert wide.traffic.experts_per_node > 160 / 50 and wide.bound == "NVLink"


def test_fp8_and_bandwidth_profiles():
    fp8_cost, bf16_cost = cost.predict(), cost.predict(fp8_dispatch=False)
    assert bf16_cost.dispatch_us / fp8_cost.dispatch_us == pytest.approx(2 * 7168 / 7392)
    assert fp8_cost.combine_us == pytest.approx(bf16_cost.combine_us)
    deepep = cost.predict(cluster=cost.Cluster.deepep())
    assert deepep.dispatch_us == pytest.approx(fp8_cost.dispatch_us * 50 / 51, rel=1e-6)


def test_redundant_experts_even_the_gpus_but_not_the_nodes():
    skewed = cost.predict(skew=1.0)
    spread = cost.predict(skew=1.0, redundant_slots=1)
    assert spread.traffic.load_imbalance < 0.9 * skewed.traffic.load_imbalance
    assert spread.dispatch_us <= skewed.dispatch_us
    assert spread.traffic.ib_out_G.sum() == skewed.traffic.ib_out_G.sum()   # copies stay on the node
