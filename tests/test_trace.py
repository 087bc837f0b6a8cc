"""Tracer and graph IR: FLOPs against the closed form, parameter roles and counts, repeated-block
counting, the graph, caching and the `inspect` fields."""

from __future__ import annotations

import json
import time
from functools import cache

import networkx as nx
import pytest
import torch

from tests.trace_configs import family_available, tiny_config
from xplan.errors import InputError
from xplan.planner import trace as trace_pkg
from xplan.planner.trace import attention_fraction, inspect_fields, trace_model
from xplan.runtime import build_model, load_config
from xplan.runtime.models import preset_names
from xplan.runtime.models.counting import count_parameters

SEQ = 4096


@cache
def preset_trace(name: str):
    return trace_model(load_config(name), SEQ, use_cache=False)


@cache
def preset_counts(name: str):
    return count_parameters(build_model(load_config(name), device="meta"))


def closed_form(name: str, seq: int = SEQ) -> float:
    """3 x [2 x active parameters without the input embedding + per layer 2 x s x heads x (d_qk + d_v) / 2],
    with a sliding-window layer's s/2 keys per query replaced by (s*w - w^2/2)/s."""
    config = load_config(name)
    counts = preset_counts(name)
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    attention = 0.0
    for layer in range(config.num_layers):
        keys = seq / 2
        if config.layer_attention_type(layer) == "sliding_attention" and config.sliding_window < seq:
            w = config.sliding_window
            keys = (seq * w - w * w / 2) / seq
        attention += 2 * keys * config.num_heads * (config.qk_head_dim + config.v_dim)
    return 3 * (2 * (counts.active - embedding) + attention)


PRESETS = ["llama3-8b", "qwen3-30b-a3b", "qwen3-235b-a22b",
           pytest.param("deepseek-v3", marks=pytest.mark.skipif(not family_available("deepseek_v3"),
                                                                reason="DeepSeek-V3 runtime not present")),
           pytest.param("gpt-oss-120b", marks=pytest.mark.skipif(not family_available("gpt_oss"),
                                                                 reason="GPT-OSS runtime not present"))]


@pytest.mark.parametrize("name", PRESETS)
def test_flops_per_token_matches_closed_form(name):
    trace = preset_trace(name)
    expected = closed_form(name)
    assert trace.flops_per_token == pytest.approx(expected, rel=0.02)
    # Forward is a third of training (backward = 2 x forward without recompute).
    assert trace.flops_per_token_forward == pytest.approx(trace.flops_per_token / 3, rel=1e-6)


@pytest.mark.skipif(not family_available("deepseek_v3"), reason="DeepSeek-V3 runtime not present")
def test_deepseek_v3_near_published_250_gflop_per_token():
    assert preset_trace("deepseek-v3").flops_per_token == pytest.approx(250e9, rel=0.02)


@pytest.mark.parametrize("name", ["llama3-8b", "qwen3-30b-a3b",
                                  pytest.param("deepseek-v3", marks=pytest.mark.skipif(
                                      not family_available("deepseek_v3"), reason="no DeepSeek-V3 runtime"))])
def test_parameter_counts_match_runtime_counting(name):
    trace, counts = preset_trace(name), preset_counts(name)
    assert trace.params_total == counts.total
    assert trace.params_active == counts.active
    routed = sum(b.count * b.params.get("routed_expert", 0) for b in trace.blocks.values())
    assert routed == counts.routed_experts


def test_parameter_roles_qwen3_moe():
    trace = preset_trace("qwen3-30b-a3b")
    moe = trace.blocks["moe"]
    assert set(moe.params) == {"attention", "dense", "routed_expert"}
    assert trace.others["embedding"].params == {"embedding": 151936 * 2048}
    assert trace.others["head"].params["head"] == 151936 * 2048
    assert moe.param_bytes["routed_expert"] == 2 * moe.params["routed_expert"]  # bf16
    assert moe.tokens_per_expert == pytest.approx(SEQ * 8 / 128)
    assert trace.graph.graph["tokens_per_expert"] == {"moe": pytest.approx(SEQ * 8 / 128)}


@pytest.mark.skipif(not family_available("deepseek_v3"), reason="DeepSeek-V3 runtime not present")
def test_repeated_blocks_traced_once(monkeypatch):
    from xplan.runtime.models import transformer

    built = []
    original = transformer.DecoderLayer.__init__

    def counting_init(self, config, layer):
        built.append(layer)
        original(self, config, layer)

    monkeypatch.setattr(transformer.DecoderLayer, "__init__", counting_init)
    trace = trace_model(load_config("deepseek-v3"), 128, use_cache=False)
    assert sorted(built) == [0, 3]  # first dense layer and first MoE layer only
    assert trace.layers == {"dense": 3, "moe": 58}
    assert trace.blocks["moe"].layer_indices == tuple(range(3, 61))
    layer_nodes = [n for n, d in trace.graph.nodes(data=True) if d["type"] == "layer"]
    assert len(layer_nodes) == 61
    assert trace.graph.nodes["layer.60"]["template"] == "block:moe"
    shared = trace.blocks["moe"].params
    assert {"shared_expert", "routed_expert", "attention", "dense"} <= set(shared)


def test_layer_count_scales_totals_not_blocks():
    small = trace_model(tiny_config("qwen3_moe", num_hidden_layers=3), 32, use_cache=False)
    big = trace_model(tiny_config("qwen3_moe", num_hidden_layers=7), 32, use_cache=False)
    assert small.layers == {"dense": 1, "moe": 2} and big.layers == {"dense": 1, "moe": 6}
    for kind in ("dense", "moe"):
        assert small.blocks[kind].flops_forward == big.blocks[kind].flops_forward
        assert small.blocks[kind].saved_bytes == big.blocks[kind].saved_bytes
    moe = small.blocks["moe"]
    assert big.flops_forward - small.flops_forward == 4 * moe.flops_forward
    assert big.saved_bytes("none") - small.saved_bytes("none") == 4 * moe.saved_bytes["none"]


def test_attention_ops_counted_causal_half():
    trace = preset_trace("llama3-8b")
    ops = [d for _, d in trace.graph.nodes(data=True) if d["type"] == "op" and d["attention"]]
    assert {d["phase"] for d in ops} == {"forward", "backward"}
    fwd = [d for d in ops if d["phase"] == "forward"]
    assert all(d["mask_fraction"] == 0.5 for d in ops)
    # Forward SDPA: 2 bmm of 2*s*s*d per head, halved.
    assert sum(d["flops"] for d in fwd) == 2 * 2 * SEQ * SEQ * 128 * 32 // 2


def test_attention_fraction_rule():
    assert attention_fraction(100, 100, causal=False, window=None) == 1.0
    assert attention_fraction(100, 100, causal=True, window=None) == 0.5
    assert attention_fraction(100, 100, causal=True, window=100) == 0.5
    assert attention_fraction(4096, 4096, causal=True, window=128) == pytest.approx((4096 * 128 - 128**2 / 2) / 4096**2)


@pytest.mark.skipif(not family_available("gpt_oss"), reason="GPT-OSS runtime not present")
def test_sliding_window_layers_cheaper():
    trace = preset_trace("gpt-oss-120b")
    sliding, full = trace.blocks["sliding_moe"], trace.blocks["full_moe"]
    config = load_config("gpt-oss-120b")
    per_key = 2 * config.num_heads * (config.head_dim * 2)  # forward FLOPs per (token, key)
    w = config.sliding_window
    keys_full, keys_sliding = SEQ / 2, (SEQ * w - w * w / 2) / SEQ
    diff = (full.flops_forward - sliding.flops_forward) / SEQ
    assert diff == pytest.approx(per_key * (keys_full - keys_sliding), rel=1e-6)


def test_graph_structure():
    trace = trace_model(tiny_config("qwen3_moe"), 32, micro_batch=2, use_cache=False)
    g = trace.graph
    assert isinstance(g, nx.DiGraph)
    types = {d["type"] for _, d in g.nodes(data=True)}
    assert types == {"stage", "block", "module", "op", "layer"}
    ops = [(n, d) for n, d in g.nodes(data=True) if d["type"] == "op"]
    assert any(d["op"] == "_grouped_mm" and d["groups"] == 8 for _, d in ops)
    assert all(d["bytes_written"] >= 0 and d["bytes_read"] >= 0 for _, d in ops)
    # Every op sits under a module or stage; data edges connect ops in a DAG.
    for n, _ in ops:
        assert any(g.edges[p, n]["kind"] == "contains" for p in g.predecessors(n))
    data = nx.DiGraph([(u, v) for u, v, d in g.edges(data=True) if d["kind"] == "data"])
    assert nx.is_directed_acyclic_graph(data)
    assert nx.has_path(data, "embed", "head")
    # Module nodes carry parameters by role.
    experts = g.nodes["block:moe/mlp.experts"]
    assert experts["params"] == {"routed_expert": 3 * 8 * 32 * 64}
    assert g.nodes["block:moe/self_attn.q_proj"]["params"] == {"attention": 64 * 64}
    # Block totals equal the sum of their ops.
    fwd = sum(d["flops"] for _, d in ops if d["stage"] == "moe" and d["phase"] == "forward")
    assert fwd == trace.blocks["moe"].flops_forward == g.nodes["block:moe"]["flops_forward"]


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    config = tiny_config("qwen3_moe")
    first = trace_model(config, 64, cache_dir=tmp_path)
    assert not first.from_cache
    start = time.perf_counter()
    second = trace_model(config, 64, cache_dir=tmp_path)
    assert time.perf_counter() - start < 0.2
    assert second.from_cache and second.to_summary() == first.to_summary()
    assert second.graph.number_of_nodes() == first.graph.number_of_nodes()
    assert not trace_model(config, 32, cache_dir=tmp_path).from_cache  # other seq len
    assert not trace_model(config, 64, micro_batch=2, cache_dir=tmp_path).from_cache
    assert not trace_model(config, 64, recompute="full", cache_dir=tmp_path).from_cache
    assert not trace_model(config, 64, loss="chunked", cache_dir=tmp_path).from_cache
    monkeypatch.setattr(trace_pkg.cache, "code_version", lambda: "changed")
    assert not trace_model(config, 64, cache_dir=tmp_path).from_cache  # code change invalidates
    monkeypatch.setenv("XPLAN_CACHE_DIR", str(tmp_path / "env"))
    trace_model(config, 16)
    assert list((tmp_path / "env" / "traces").glob("*.json"))


def test_recompute_argument_selects_policy_on_layers():
    trace = trace_model(tiny_config("qwen3"), 32, recompute="full", use_cache=False)
    node = trace.graph.nodes["layer.0"]
    assert node["saved_bytes"] == trace.blocks["dense"].saved_bytes["full"]
    assert node["recompute_flops"] == trace.blocks["dense"].flops_forward
    assert trace.saved_bytes() == trace.saved_bytes("full") < trace.saved_bytes("selective") < trace.saved_bytes("none")


def test_inspect_fields_and_graphml(tmp_path):
    path = tmp_path / "g.graphml"
    fields = inspect_fields(tiny_config("qwen3_moe"), 64, graph_path=path, cache_dir=tmp_path)
    json.dumps(fields)
    assert {"flops_per_token", "flops_per_token_forward", "activation_bytes_per_token", "layers"} <= set(fields)
    assert fields["layers"] == {"dense": 1, "moe": 2}
    act = fields["activation_bytes_per_token"]
    assert list(act) == ["embedding", "dense", "moe", "head"]
    assert set(act["moe"]) == {"none", "selective", "full"}
    assert act["moe"]["full"] < act["moe"]["selective"] < act["moe"]["none"]
    g = nx.read_graphml(path)
    assert g.number_of_nodes() > 50 and g.nodes["layer.2"]["kind"] == "moe"


def test_bad_input():
    with pytest.raises(InputError):
        trace_model(tiny_config("qwen3"), 32, recompute="sometimes", use_cache=False)
    with pytest.raises(InputError):
        trace_model(tiny_config("qwen3"), 32, loss="fused", use_cache=False)
    with pytest.raises(InputError):
        trace_model(tiny_config("qwen3"), 0, use_cache=False)


def test_presets_all_trace_at_short_seq():
    covered = {"llama3-8b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "gpt-oss-120b"}
    for name in preset_names():
        config = load_config(name)
        if name in covered or not family_available(config.family):
            continue
        trace = trace_model(config, 64, use_cache=False)
        assert trace.flops_per_token > 0 and sum(trace.layers.values()) == config.num_layers


def test_chunked_loss_same_training_flops_no_logits():
    config = tiny_config("qwen3", vocab_size=4096)
    full = trace_model(config, 64, use_cache=False)
    chunked = trace_model(config, 64, loss="chunked", use_cache=False)
    assert chunked.flops_per_token == full.flops_per_token
    # The chunked kernel computes the head's gradients in its forward.
    head = full.others["head"]
    assert chunked.others["head"].flops_forward == head.flops_forward + head.flops_backward
    assert chunked.others["head"].saved_bytes["none"] < head.saved_bytes["none"]


def test_dtype_changes_bytes_not_flops():
    bf16 = trace_model(tiny_config("qwen3"), 32, use_cache=False)
    fp32 = trace_model(tiny_config("qwen3"), 32, dtype=torch.float32, use_cache=False)
    assert bf16.flops_per_token == fp32.flops_per_token
    assert fp32.blocks["dense"].param_bytes["attention"] == 2 * bf16.blocks["dense"].param_bytes["attention"]
