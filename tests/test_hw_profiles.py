"""Hardware profiles: the shipped YAMLs, the schema's error messages, the helpers' arithmetic."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import value_paths
from xplan.errors import InputError
from xplan.hw_profiles import (
    COLLECTIVES,
    PROFILE_DIR,
    Profile,
    load_profile,
    profile_from_dict,
    profile_from_yaml,
    profile_names,
    save_profile,
)

SHIPPED = ["a100", "a3", "ascend-910b", "cpu", "h100", "h100-hbm2e-96gb", "h200", "h800"]


@pytest.fixture(scope="module")
def profiles() -> dict[str, Profile]:
    return {n: load_profile(n) for n in profile_names()}


def _raw(name: str) -> dict:
    return yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())


def _error(data) -> str:
    with pytest.raises(InputError) as info:
        profile_from_dict(data, origin="test.yaml")
    return str(info.value)


# ---------------------------------------------------------------------- shipped profiles
def test_shipped_names():
    assert profile_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_and_round_trips(name, tmp_path):
    p = load_profile(name)
    assert p.name == name
    assert profile_from_yaml(p.to_yaml()) == p
    assert profile_from_dict(p.to_dict()) == p
    out = save_profile(p, tmp_path / f"{name}-copy.yaml", header="a header\nline two")
    assert out.read_text().startswith("# a header\n# line two\n")
    assert load_profile(out) == p
    assert load_profile(str(out)) == p
    json.dumps(p.summary())  # the CLI prints it as JSON


def test_every_shipped_number_has_a_source(profiles):
    for p in profiles.values():
        assert p.sources, p.name
        assert all(isinstance(v, str) and v for v in p.sources.values())


def test_cpu_profile_records_how_it_was_measured(profiles):
    text = " ".join(profiles["cpu"].sources.values())
    assert "`xplan calibrate --processes 2 -o hw_profiles/cpu.yaml`" in text
    assert re.search(r"\d{4}-\d{2}-\d{2}", text)
    assert (PROFILE_DIR / "cpu.yaml").read_text().startswith("# Measured on this machine by")


def test_a3_device_is_a_910c_package(profiles):
    a3, b = profiles["a3"], profiles["ascend-910b"]
    assert a3.device.ranks_per_device == 2 and b.device.ranks_per_device == 1
    assert "package" in a3.device.definition
    # one package = two 910B-class dies
    assert a3.compute.peak_tflops.bf16 == 2 * b.compute.peak_tflops.bf16 == 752
    assert a3.memory.hbm_gib == 2 * b.memory.hbm_gib == 128
    assert a3.memory.hbm_tbps == pytest.approx(2 * b.memory.hbm_tbps)
    assert a3.levels[0].bandwidth_gbps == 2 * b.levels[0].bandwidth_gbps
    assert [lv.devices for lv in a3.levels] == [8, 384, None]


# ---------------------------------------------------------------------- hand-computable checks
def test_h800_levels(profiles):
    p = profiles["h800"]
    assert p.level_for_group(1) == 0
    assert p.level_for_group(8) == 0                    # the NVLink island
    assert p.level_for_group(16) == 1                   # two nodes: the network
    assert p.level_for_group(4, stride=2) == 0          # {0,2,4,6}: one node
    assert p.level_for_group(2, stride=8) == 1          # {0,8}: two nodes
    assert p.level_for_group(3) == 1                    # groups of 3 straddle nodes
    assert p.level_for_group(256, stride=1) == 1
    assert p.level_index("ib") == 1
    assert p.latency(0) == pytest.approx(3.33e-6)
    assert p.latency("ib") == pytest.approx(3.7e-6)


def test_a3_levels_and_whole_supernode_jobs(profiles):
    p = profiles["a3"]
    assert p.level_for_group(8) == 0
    assert p.level_for_group(16) == 1                   # 2 nodes of one supernode
    assert p.level_for_group(128) == 1                  # 384 % 128 == 0
    assert p.level_for_group(256) == 2                  # aligned blocks of 256 straddle supernodes...
    assert p.level_for_group(256, total_devices=256) == 1  # ...unless the whole job is one supernode
    assert p.level_for_group(768) == 2


def test_compute_and_memory_accessors(profiles):
    p = profiles["h800"]
    assert p.peak_flops("bf16") == 989e12
    assert p.peak_flops("float8_e4m3fn") == 1979e12
    assert p.hbm_bytes() == 80 * 2**30
    assert p.hbm_bandwidth() == pytest.approx(3.35e12 * 0.9)
    assert p.host_bandwidth() == pytest.approx(64e9 * 0.8)
    assert p.host_memory_bytes() == 256 * 2**30
    with pytest.raises(InputError, match="no fp8"):
        profiles["a100"].peak_flops("fp8")
    with pytest.raises(InputError, match="unknown dtype"):
        p.peak_flops("int4")
    with pytest.raises(ValueError):
        p.level_index("nvswitch")
    with pytest.raises(ValueError):
        p.level_index(2)


# ---------------------------------------------------------------------- bad input -> InputError naming the field
def test_unknown_key_is_named():
    data = _raw("h800")
    data["compute"]["peak_tflops"]["bf17"] = 1
    msg = _error(data)
    assert "compute.peak_tflops.bf17 is not a known field" in msg
    data = _raw("h800")
    data["interconect"] = {}
    assert "interconect is not a known field (did you mean 'interconnect'?)" in _error(data)


def test_missing_field_is_named():
    data = _raw("h800")
    del data["memory"]["hbm_tbps"]
    assert "memory.hbm_tbps is missing" in _error(data)
    data = _raw("h800")
    del data["interconnect"]["levels"][1]["latency_us"]
    assert "interconnect.levels[1].latency_us is missing" in _error(data)


def test_negative_bandwidth_is_named():
    data = _raw("h800")
    data["interconnect"]["levels"][0]["bandwidth_gbps"] = -5
    msg = _error(data)
    assert "interconnect.levels[0].bandwidth_gbps must be > 0 (got -5)" in msg
    assert "test.yaml" in msg and "README" in msg


def test_fraction_above_one_is_named():
    data = _raw("h800")
    data["interconnect"]["levels"][1]["fraction"]["all_to_all"] = 1.5
    assert "interconnect.levels[1].fraction.all_to_all must be <= 1 (got 1.5)" in _error(data)
    data = _raw("h800")
    data["memory"]["hbm_fraction"] = 0
    assert "memory.hbm_fraction must be > 0" in _error(data)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["memory"].__setitem__("hbm_gib", float("nan")), "memory.hbm_gib must be a finite number"),
        (lambda d: d["memory"].__setitem__("hbm_gib", "80"), "memory.hbm_gib must be a number (got str '80')"),
        (lambda d: d["memory"].__setitem__("hbm_gib", True), "memory.hbm_gib must be a number"),
        (lambda d: d["device"].__setitem__("kind", "tpu"), "device.kind must be"),
        (lambda d: d.__setitem__("schema_version", 2), "schema_version must be 1"),
        (lambda d: d["interconnect"]["levels"][1].__setitem__("devices", 12),
         "interconnect: levels[1].devices (12) must be a larger multiple of levels[0].devices (8)"),
        (lambda d: d["interconnect"]["levels"][0].__setitem__("devices", None),
         "levels[0].devices is null (unbounded) but is not the last level"),
        (lambda d: d["interconnect"]["levels"][1].__setitem__("name", "nvlink"), "repeats an earlier level's name"),
        (lambda d: d["interconnect"].__setitem__("levels", []), "interconnect.levels"),
        (lambda d: d["interconnect"]["levels"][0].__setitem__("devices", 1), "interconnect.levels[0].devices must be >= 2"),
        (lambda d: d["compute"]["gemm"]["max_fraction"].__setitem__("fp8", None),
         "peak_tflops.fp8 is set but gemm.max_fraction.fp8 is null"),
        (lambda d: d["sources"].pop("memory.hbm_tbps"), "sources has no entry for memory.hbm_tbps"),
        (lambda d: d["sources"].__setitem__("memory.hbm_tbs", "typo"), "sources names fields that do not exist: memory.hbm_tbs"),
        (lambda d: d["device"].__setitem__("ranks_per_device", 0), "device.ranks_per_device must be >= 1"),
        (lambda d: d["compute"]["gemm"].__setitem__("overhead_us", -1), "compute.gemm.overhead_us must be >= 0"),
        (lambda d: d.__setitem__("name", "bad name!"), "name must be a simple name"),
    ],
)
def test_impossible_values_are_named(mutate, expected):
    data = _raw("h800")
    mutate(data)
    assert expected in _error(data)


def test_many_errors_are_summarised():
    data = _raw("h800")
    for lv in data["interconnect"]["levels"]:
        for k in lv["fraction"]:
            lv["fraction"][k] = 2
    msg = _error(data)
    assert "and 5 more problem(s)" in msg


def test_loader_errors(tmp_path):
    with pytest.raises(InputError, match=r"unknown hardware profile 'h900'.*shipped profiles are a100, a3"):
        load_profile("h900")
    with pytest.raises(InputError, match="did you mean 'h800'"):
        load_profile("h8000")
    with pytest.raises(InputError, match="does not exist"):
        load_profile(str(tmp_path / "nope.yaml"))
    with pytest.raises(InputError, match="is a directory"):
        load_profile(tmp_path)
    with pytest.raises(InputError, match="name or a path"):
        load_profile("")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match=r"not valid YAML at line \d+, column \d+"):
        load_profile(bad)
    bad.write_text("")
    with pytest.raises(InputError, match="is empty"):
        load_profile(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="is a list, not a mapping"):
        load_profile(bad)
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="cannot read hardware profile"):
        load_profile(bad)
    bad.write_text("when: 2001-02-30\n")
    with pytest.raises(InputError):
        load_profile(bad)
    bad.write_text("a: &x [*x]\n")
    with pytest.raises(InputError):
        load_profile(bad)


def test_user_profile_by_path(tmp_path):
    data = _raw("h800")
    data["name"] = "my-h800"
    data["interconnect"]["levels"][1]["bandwidth_gbps"] = 25
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    p = load_profile(str(path))
    assert p.name == "my-h800"
    assert p.levels[1].bandwidth_gbps == 25


def test_level_for_group_beyond_a_bounded_top_level():
    data = _raw("h800")
    data["interconnect"]["levels"][1]["devices"] = 64
    p = profile_from_dict(data)
    assert p.level_for_group(64) == 1
    with pytest.raises(InputError, match="more than the largest interconnect level"):
        p.level_for_group(128)


# ---------------------------------------------------------------------- fuzzing: only InputError escapes
_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=12)
_json = st.recursive(
    _scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=25,
)
_fields = st.sampled_from(
    ["schema_version", "name", "description", "device", "compute", "memory", "host", "interconnect", "sources",
     "levels", "bandwidth_gbps", "fraction", "peak_tflops", "bf16", "fp8", "gemm", "devices"]
)
_field_dicts = st.recursive(
    _scalars, lambda kids: st.dictionaries(_fields, kids, max_size=6) | st.lists(kids, max_size=3), max_leaves=30
)
_FUZZ = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_input_error(fn, *args) -> None:
    try:
        result = fn(*args)
    except InputError:
        return
    assert isinstance(result, Profile)


@_FUZZ
@given(st.one_of(_json, _field_dicts))
def test_fuzz_dicts_raise_only_input_error(data):
    _only_input_error(profile_from_dict, data)


@_FUZZ
@given(st.text(max_size=200))
def test_fuzz_yaml_text_raises_only_input_error(text):
    _only_input_error(profile_from_yaml, text)


_BASE = yaml.safe_load((PROFILE_DIR / "a3.yaml").read_text())
_BASE_PATHS = list(value_paths(_BASE))


@_FUZZ
@given(st.sampled_from(_BASE_PATHS), st.one_of(st.just("<delete>"), _json), st.booleans())
def test_fuzz_mutated_profiles_raise_only_input_error(path, value, via_yaml):
    data = copy.deepcopy(_BASE)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if value == "<delete>":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    if via_yaml:
        try:
            text = yaml.safe_dump(data)
        except yaml.YAMLError:
            return
        _only_input_error(profile_from_yaml, text)
    else:
        _only_input_error(profile_from_dict, data)


def test_collective_kinds_are_the_documented_five():
    assert COLLECTIVES == ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "p2p")


def test_allocator_fragmentation_is_optional_and_below_one():
    data = _raw("h100")
    assert profile_from_dict(copy.deepcopy(data)).memory.fragmentation == pytest.approx(0.176)
    del data["memory"]["fragmentation"]
    assert profile_from_dict(copy.deepcopy(data)).memory.fragmentation is None
    data["memory"]["fragmentation"] = 1.0
    assert "memory.fragmentation" in _error(data)


def test_optional_kernel_fractions_are_bounded():
    data = _raw("h800")
    data["compute"]["gemm"]["epilogue_fraction"] = -0.1
    assert "compute.gemm.epilogue_fraction must be >= 0" in _error(data)
    data = _raw("h100")
    data["compute"]["attention"]["sdpa_fraction"] = 1.5
    assert "compute.attention.sdpa_fraction must be <= 1" in _error(data)
    data = _raw("h100")
    data["compute"]["gemm"]["unaligned"]["odd"] = 1.5
    assert "compute.gemm.unaligned.odd must be <= 1" in _error(data)


def test_profiles_import_no_layer_above_them():
    """hw_profiles is data, schema, loader and measurement: it imports nothing from the cost
    models, the planner, the runtime or the CLI (the formulas live in cost_models.kernels)."""
    import ast

    above = ("xplan.cost_models", "xplan.planner", "xplan.runtime", "xplan.cli")
    for path in PROFILE_DIR.rglob("*.py"):
        depth = len(path.relative_to(PROFILE_DIR).parts) - 1  # sub-packages below hw_profiles
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                # a relative import may climb to hw_profiles itself, no higher
                assert node.level - 1 <= depth, f"{path.relative_to(PROFILE_DIR)} imports from outside hw_profiles"
                names = [node.module or ""] if node.level == 0 else []
            bad = [n for n in names if n.startswith(above)]
            assert not bad, f"{path.relative_to(PROFILE_DIR)} imports {bad}"
