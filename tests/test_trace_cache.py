"""The JSON caches (traces, model configs, parameter counts): exact round trips, damaged entries
are misses (never an exception, never a wrong trace), and a warm cache needs neither torch nor
transformers (issues #14 and #15)."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import textwrap

import pytest

from tests.trace_configs import TINY, family_available, tiny_config
from xplan.planner.trace import RECOMPUTE_POLICIES, cache, configs, store, trace_model
from xplan.planner.trace.model_trace import same_trace, trace_from_json, trace_to_json

FAMILIES = [f for f in TINY if family_available(f)]


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """Configs and counts go to $XPLAN_CACHE_DIR: point it at an empty folder."""
    monkeypatch.setenv("XPLAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A tiny MoE trace written to a fresh cache, and the key of its entry."""
    cache_dir = tmp_path_factory.mktemp("trace-cache")
    config = tiny_config("qwen3_moe")
    trace = trace_model(config, 64, cache_dir=cache_dir, loss="chunked")
    return config, cache_dir, cache.cache_key(config, 64, 1, "none", "bfloat16", "chunked"), trace


def test_recompute_policies_match_the_runtime():
    from xplan.runtime.recompute import RECOMPUTE_POLICIES as runtime_policies

    assert RECOMPUTE_POLICIES == runtime_policies


@pytest.mark.parametrize("family", FAMILIES)
def test_json_round_trip_is_exact(family):
    trace = trace_model(tiny_config(family), 32, use_cache=False)
    back = trace_from_json(json.loads(json.dumps(trace_to_json(trace))))
    assert same_trace(back, trace)
    assert back.to_summary() == trace.to_summary()
    for node in trace.graph:
        assert set(back.graph.predecessors(node)) == set(trace.graph.predecessors(node))
        assert list(back.graph.successors(node)) == list(trace.graph.successors(node))


def test_cache_hit_prices_like_a_fresh_trace(traced):
    from xplan.cost_models import estimate
    from xplan.hw_profiles import load_profile
    from xplan.layout import Layout

    config, cache_dir, _, fresh = traced
    hit = trace_model(config, 64, cache_dir=cache_dir, loss="chunked")
    assert hit.from_cache
    layout = Layout(devices=4, fsdp=4, ep=2, micro_batch=2, recompute="selective",
                    kernels={"loss": "chunked", "elementwise": "eager"})
    assert estimate(hit, config, layout, load_profile("cpu"), 8) == estimate(fresh, config, layout,
                                                                            load_profile("cpu"), 8)


def _rewrite(path, payload_bytes: bytes, key: str, good_checksum: bool = True) -> None:
    digest = hashlib.sha256(payload_bytes).hexdigest() if good_checksum else "0" * 64
    header = json.dumps({"format": store.STORE_FORMAT, "key": key, "sha256": digest}).encode()
    path.write_bytes(header + b"\n" + payload_bytes)


def _damaged_entries(original: bytes, key: str):
    """(name, bytes) of damaged versions of one entry file."""
    rng = random.Random(15)
    header, _, payload = original.partition(b"\n")
    for i in range(8):
        data = bytearray(original)
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        yield f"bit flip {i}", bytes(data)
    for cut in (0, 1, len(header), len(header) + 1, len(original) // 2, len(original) - 1):
        yield f"truncated at {cut}", original[:cut]
    yield "random bytes", rng.randbytes(4096)
    yield "random bytes after the header", header + b"\n" + rng.randbytes(len(payload))
    yield "entry of another key", original.replace(key.encode(), key[:-1].encode() + b"x", 1)
    yield "entry of an older format", original.replace(b'"format": 2', b'"format": 1', 1)


def _valid_checksum_garbage(payload: dict):
    """Payloads with a correct checksum but the wrong shape: wrong types, huge numbers, gaps."""
    def edited(edit):
        data = json.loads(json.dumps(payload))
        edit(data)
        return json.dumps(data).encode()

    yield "not an object", b"[1, 2, 3]"
    yield "string seq_len", edited(lambda d: d.update(seq_len="64"))
    yield "huge seq_len", edited(lambda d: d.update(seq_len=10**30))
    yield "bool count", edited(lambda d: d["blocks"][0].update(count=True))
    yield "huge flops", edited(lambda d: d["blocks"][0].update(flops_forward=2**64))
    yield "infinite flops", edited(lambda d: d["blocks"][0].update(flops_forward=1e400))
    yield "NaN", json.dumps(payload).replace('"trace_time_s":', '"trace_time_s": NaN, "x":', 1).encode()
    yield "missing head", edited(lambda d: d.update(others=d["others"][:1]))
    yield "missing field", edited(lambda d: d["blocks"][0].pop("saved_bytes"))
    yield "extra field", edited(lambda d: d["blocks"][0].update(extra=1))
    yield "wrong layer count", edited(lambda d: d.update(layer_kinds=d["layer_kinds"][:-1]))
    yield "dict params", edited(lambda d: d["blocks"][0].update(params={"dense": "many"}))
    yield "edge to nowhere", edited(lambda d: d["graph"]["edges"].append(["op0", "nowhere", {}]))
    yield "node without attributes", edited(lambda d: d["graph"]["nodes"].append(["x"]))
    yield "deep nesting", json.dumps(payload).replace('"graph":', '"g":' + "[" * 100000 + "]" * 100000
                                                        + ', "graph":', 1).encode()
    yield "10k-digit integer", json.dumps(payload).replace('"seq_len": 64', '"seq_len": ' + "9" * 10000, 1).encode()


def test_damaged_trace_entries_are_misses(traced):
    config, cache_dir, key, fresh = traced
    path = cache.entry_path(cache_dir, key)
    original = path.read_bytes()
    payload = json.loads(original.partition(b"\n")[2])
    cases = [(name, data, None) for name, data in _damaged_entries(original, key)]
    cases += [(name, data, True) for name, data in _valid_checksum_garbage(payload)]
    try:
        for name, data, checksum in cases:
            if checksum:
                _rewrite(path, data, key)
            else:
                path.write_bytes(data)
            assert cache.load(cache_dir, key) is None, name
    finally:
        path.write_bytes(original)
    assert cache.load(cache_dir, key) is not None


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage types"])
def test_damaged_entry_is_retraced_to_the_same_numbers(traced, damage):
    config, cache_dir, key, fresh = traced
    path = cache.entry_path(cache_dir, key)
    original = path.read_bytes()
    if damage == "flip":
        data = bytearray(original)
        data[len(data) // 3] ^= 0x20
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(original[: len(original) // 2])
    else:
        payload = json.loads(original.partition(b"\n")[2])
        payload["blocks"][0]["saved_bytes"] = {"none": "lots"}
        _rewrite(path, json.dumps(payload).encode(), key)
    again = trace_model(config, 64, cache_dir=cache_dir, loss="chunked")
    assert not again.from_cache
    again.trace_time_s = fresh.trace_time_s
    assert same_trace(again, fresh)
    assert trace_model(config, 64, cache_dir=cache_dir, loss="chunked").from_cache  # rewritten intact


def test_unwritable_cache_dir_only_disables_caching(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    trace = trace_model(tiny_config("qwen3"), 16, cache_dir=blocker)
    assert not trace.from_cache and trace.flops_per_token > 0


def test_config_cache_is_exact_and_survives_damage(cache_env):
    from xplan.runtime.models import load_config, preset_names

    for name in preset_names():
        first = configs.load_model_config(name)  # parsed with transformers, then stored
        hit = configs.load_model_config(name)
        expected = load_config(name)
        assert first == hit == expected and hit.hf_dict == expected.hf_dict, name
        assert repr(hit) == repr(expected)
    entries = sorted((cache_env / configs.CONFIG_KIND).glob("*.json"))
    assert len(entries) == len(preset_names())
    for path in entries:
        path.write_bytes(path.read_bytes()[:-7])
    assert configs.load_model_config("deepseek-v3").hf_dict == load_config("deepseek-v3").hf_dict


def test_config_entry_with_wrong_types_is_a_miss(cache_env):
    from xplan.runtime.models import load_config

    configs.load_model_config("qwen3-8b")
    (path,) = (cache_env / configs.CONFIG_KIND).glob("*.json")
    key = path.stem
    entry = json.loads(path.read_bytes().partition(b"\n")[2])
    for field, value in (("num_layers", "36"), ("num_layers", True), ("rms_norm_eps", 1), ("moe_layers", [1]),
                         ("num_heads", 2**70), ("rope", {"L": []}), ("hf_dict", {"D": [[[1], 2]]})):
        _rewrite(path, json.dumps({**entry, "config": {**entry["config"], field: value}}).encode(), key)
        assert configs.store.read_entry(None, configs.CONFIG_KIND, key) is not None
        with pytest.raises(ValueError):
            configs._config_from_json(configs.store.read_entry(None, configs.CONFIG_KIND, key)["config"])
        assert configs.load_model_config("qwen3-8b") == load_config("qwen3-8b")
    for garbage in ({"config": entry["config"]}, {**entry, "stderr": 7}, entry["config"]):
        _rewrite(path, json.dumps(garbage).encode(), key)
        assert configs.load_model_config("qwen3-8b") == load_config("qwen3-8b")


def test_a_warm_config_repeats_the_parse_warnings(cache_env, tmp_path, capsys):
    from tests.conftest import TINY_MOE

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({**TINY_MOE, "my_extra_knob": 1}))
    cold = configs.load_model_config(str(model_dir))
    cold_err = capsys.readouterr().err
    assert "my_extra_knob" in cold_err
    assert configs.load_model_config(str(model_dir)) == cold
    assert capsys.readouterr().err == cold_err


def test_parameter_counts_cached_equal_the_runtime_count(cache_env):
    from xplan.runtime import build_model, load_config
    from xplan.runtime.models.counting import count_parameters

    for name in ("qwen3-30b-a3b", "deepseek-v3", "llama3-8b"):
        config = load_config(name)
        expected = count_parameters(build_model(config, device="meta"))
        for _ in range(2):  # counted and stored, then read back
            counts = configs.parameter_counts(config)
            assert (counts.total, counts.active, counts.routed_experts, counts.layers_by_kind) == (
                expected.total, expected.active, expected.routed_experts, expected.layers_by_kind)
    (path, *_) = (cache_env / configs.COUNTS_KIND).glob("*.json")
    path.write_bytes(b"\x00" * 100)
    assert configs.parameter_counts(load_config("qwen3-30b-a3b")).total > 0


def test_warm_cache_needs_neither_torch_nor_transformers(cache_env, tiny_moe_dir, capsys):
    """Config, trace and counts from a warm cache; layouts priced; torch never imported."""
    from xplan.cli import main
    from xplan.planner import pricing

    search = ["search", tiny_moe_dir, "cpu", "--devices", "4", "--seq-len", "64", "--global-batch", "8", "--json"]
    inspect = ["inspect", tiny_moe_dir, "--seq-len", "64", "--json"]
    # Warm the cache in this process (torch is loaded here anyway); the per-process memos must
    # not hide a cache write.
    pricing.get_trace.cache_clear()
    pricing.load_model_config.cache_clear()
    for args in (search, ["models", "--json"], inspect):
        assert main(args) == 0, args
    capsys.readouterr()
    code = textwrap.dedent(f"""
        import sys
        from xplan.cli import main
        for args in ({search!r}, ["models", "--json"], {inspect!r}):
            assert main(args) == 0, args
        heavy = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not heavy, heavy
    """)
    warm = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr
