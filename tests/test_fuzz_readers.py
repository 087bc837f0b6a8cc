"""Hypothesis fuzzing of the four input readers through the CLI (issue 15): a plan, a hardware
profile, a model's config.json and a trace-cache entry. Whatever the input (non-UTF-8 bytes, deep
nesting, markup, typo'd keys, huge or odd values), `xplan` exits 0 or 2, never 1 or a traceback;
a damaged cache entry is a miss. Each test runs well under 60 s on 2 cores (cheap tiny model)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from tests.conftest import TINY_MOE, value_paths
from xplan.cli import main
from xplan.hw_profiles.loader import PROFILE_DIR
from xplan.planner import pricing
from xplan.planner.trace import cache

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SEQ = "64"

MARKUP = st.sampled_from(["[bold]x[/]", "[/]", "[/__w/pytorch/x]", "[link=file:///etc]x", "\x00", "\udcff", "💥"])
HUGE = st.sampled_from([10**30, -10**30, 2**63, 2**64 + 1, 1e308, -1e308, float("inf"), float("nan"), 0, -1])
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12) | MARKUP
           | HUGE)
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    st.text(max_size=8) | MARKUP, kids, max_size=3), max_leaves=12)
DEEP = st.sampled_from(["[" * 20000, "{a: " * 20000, "- " * 20000 + "1", "a:\n" + "".join(
    "  " * i + "b:\n" for i in range(2000))])


def _typo(key) -> str:
    key = str(key)
    return key[:-1] if len(key) > 1 else key + "_"


def mutate(base, path, action: str, value):
    """`base` with the item at `path` replaced by `value`, deleted, or its key misspelt."""
    data = copy.deepcopy(base)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "typo" and isinstance(parent, dict):
        parent[_typo(last)] = parent.pop(last)
    else:
        parent[last] = value
    return data


# Plausible numbers too, so that many edits are accepted and priced (not only refused).
NUMBERS = st.floats(min_value=0, max_value=1e15) | st.integers(0, 10**7)


def mutations(base):
    return st.tuples(st.sampled_from(list(value_paths(base))), st.sampled_from(["set", "delete", "typo"]),
                     VALUES | NUMBERS)


def dump(data, as_json: bool = False) -> bytes | None:
    try:
        text = json.dumps(data, allow_nan=True) if as_json else yaml.safe_dump(data, allow_unicode=True)
        return text.encode("utf-8", "surrogatepass")
    except (yaml.YAMLError, ValueError, TypeError, UnicodeEncodeError):
        return None


def raw_inputs():
    """Byte strings: random bytes, non-UTF-8 bytes around valid text, deep nesting, markup."""
    return st.one_of(
        st.binary(max_size=300),
        st.tuples(st.text(max_size=40), st.binary(min_size=1, max_size=8)).map(
            lambda t: t[0].encode() + b"\xff" + t[1]),
        DEEP.map(str.encode),
        MARKUP.map(lambda m: f"name: {m}\n".encode("utf-8", "surrogatepass")),
    )


def cli(args) -> int:
    pricing.get_trace.cache_clear()
    pricing.load_hw.cache_clear()
    pricing.load_model_config.cache_clear()
    code = main([str(a) for a in args])
    if currently_in_test_context():
        event(f"exit {code}")  # pytest --hypothesis-show-statistics: how many inputs were accepted
    return code


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model directory and a cache directory holding its trace, shared by every example."""
    root = tmp_path_factory.mktemp("fuzz")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_MOE))
    mp = pytest.MonkeyPatch()
    mp.setenv("XPLAN_CACHE_DIR", str(root / "cache"))
    assert cli(["estimate", model, "h800", "--devices", "8", "--seq-len", SEQ, "--json"]) == 0
    (entry,) = (root / "cache" / cache.KIND).glob("*.json")
    (root / "entry").write_text(str(entry))
    yield root, model
    mp.undo()


# ------------------------------------------------------------------------------------- profile
PROFILE = yaml.safe_load((PROFILE_DIR / "h800.yaml").read_text())


def _estimate_with_profile(env, data: bytes) -> int:
    root, model = env
    path = root / "profile.yaml"
    path.write_bytes(data)
    return cli(["estimate", model, path, "--devices", "8", "--seq-len", SEQ, "--json"])


@FUZZ
@given(change=mutations(PROFILE))
def test_fuzz_profile_edits_exit_0_or_2(env, capsys, change):
    data = dump(mutate(PROFILE, *change))
    if data is not None:
        assert _estimate_with_profile(env, data) in (0, 2)
    capsys.readouterr()


@FUZZ
@given(data=raw_inputs())
def test_fuzz_profile_bytes_exit_2(env, capsys, data):
    assert _estimate_with_profile(env, data) == 2
    capsys.readouterr()


# ---------------------------------------------------------------------------------------- plan
def _plan(model) -> dict:
    return {"xplan_plan": 1, "model": str(model), "hardware": "h800", "devices": 8,
            "layout": {"fsdp": 8, "micro_batch": 1}, "training": {"seq_len": int(SEQ), "global_batch": 8}}


def _whatif(env, data: bytes) -> int:
    root, _ = env
    path = root / "plan.yaml"
    path.write_bytes(data)
    return cli(["whatif", path, "--json"])


def test_fuzz_plan_base_is_valid(env, capsys):
    assert _whatif(env, dump(_plan(env[1]))) == 0
    capsys.readouterr()


@FUZZ
@given(change=mutations(_plan("MODEL")))
def test_fuzz_plan_edits_exit_0_or_2(env, capsys, change):
    plan = _plan(env[1])
    data = dump(mutate(plan, *change))
    if data is not None:
        assert _whatif(env, data) in (0, 2)
    capsys.readouterr()


@FUZZ
@given(data=raw_inputs())
def test_fuzz_plan_bytes_exit_2(env, capsys, data):
    assert _whatif(env, data) == 2
    capsys.readouterr()


# ---------------------------------------------------------------------------------- config.json
def _inspect(env, data: bytes) -> int:
    root, _ = env
    model = root / "fuzzed-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_bytes(data)
    return cli(["inspect", model, "--seq-len", SEQ, "--json"])


@FUZZ
@given(change=mutations(TINY_MOE))
def test_fuzz_config_json_edits_exit_0_or_2(env, capsys, change):
    data = dump(mutate(TINY_MOE, *change), as_json=True)
    if data is not None:
        assert _inspect(env, data) in (0, 2)
    capsys.readouterr()


@FUZZ
@given(data=raw_inputs())
def test_fuzz_config_json_bytes_exit_2(env, capsys, data):
    assert _inspect(env, data) == 2
    capsys.readouterr()


# --------------------------------------------------------------------------------- trace cache
def _entry(env):
    from pathlib import Path

    return Path((env[0] / "entry").read_text())


@settings(FUZZ, max_examples=25)  # a miss retraces the tiny model (~1 s)
@given(data=st.data())
def test_fuzz_trace_cache_entries_are_misses_or_price(env, capsys, data):
    """A damaged entry (bytes or, with a valid checksum, any payload edit) is a miss that is
    retraced, or a trace that prices; the estimate exits 0 either way."""
    path = _entry(env)
    original = path.read_bytes()
    header, _, body = original.partition(b"\n")
    key = json.loads(header)["key"]
    try:
        if data.draw(st.booleans(), label="payload edit"):
            payload = json.loads(body)
            changed = mutate(payload, *data.draw(mutations_of_trace(payload), label="edit"))
            assert cache.store.write_entry(path.parent.parent, cache.KIND, key, changed) in (path, None)
        else:
            at = data.draw(st.integers(0, len(original) - 1), label="at")
            junk = data.draw(st.binary(max_size=16), label="junk")
            path.write_bytes(original[:at] + junk + original[at + len(junk) + data.draw(st.integers(0, 1)):])
        assert cli(["estimate", env[1], "h800", "--devices", "8", "--seq-len", SEQ, "--json"]) == 0
    finally:
        path.write_bytes(original)
    capsys.readouterr()


def mutations_of_trace(payload):
    # Graph paths are many and alike: sample the scalar fields, blocks and a few graph nodes.
    top = [p for p in value_paths({k: v for k, v in payload.items() if k != "graph"})]
    graph = [("graph", "nodes", i, 1, k) for i in range(min(20, len(payload["graph"]["nodes"])))
             for k in payload["graph"]["nodes"][i][1]]
    return st.tuples(st.sampled_from(top + graph), st.sampled_from(["set", "delete", "typo"]), VALUES)


@pytest.mark.parametrize("attr, value", [
    ("flops", None), ("flops", -1), ("bytes_read", "1"), ("phase", "sideways"), ("out_shape", "²x3"),
    ("out_shape", "0x64"), ("repeat", 0), ("mask_fraction", 2.0), ("attention", 1), ("stage", None),
])
def test_forged_op_nodes_are_misses(env, attr, value):
    """Found by the fuzzer: an op node with `flops: null` (checksum intact) crashed pricing."""
    path = _entry(env)
    original = path.read_bytes()
    header, _, body = original.partition(b"\n")
    key = json.loads(header)["key"]
    payload = json.loads(body)
    node = next(attrs for _, attrs in payload["graph"]["nodes"] if attrs.get("type") == "op" and attrs["flops"])
    node[attr] = value
    try:
        cache.store.write_entry(path.parent.parent, cache.KIND, key, payload)
        assert cache.load(path.parent.parent, key) is None
    finally:
        path.write_bytes(original)
    assert cache.load(path.parent.parent, key) is not None


def test_unaligned_expert_widths_trace(env, capsys):
    """Found by the fuzz test above: experts whose rows are not 16-byte aligned (hidden 1) run as a
    loop of matmuls, which fake tensors cannot split by counts; the tracer prices their shapes."""
    assert _inspect(env, dump(mutate(TINY_MOE, ("hidden_size",), "set", 1), as_json=True)) == 0
    capsys.readouterr()
