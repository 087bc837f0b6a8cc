"""Bad input never crashes: every reader maps undecodable, deeply nested, oversized or mistyped
input to exit 2 (or a cache miss), messages are printed literally, and --json failures are JSON."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xplan.cli import main
from xplan.errors import InputError
from xplan.plan import load_plan

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", ["[/x]", "[bold]x", "[/__w/pytorch/x]", "x[/]y"])
def test_markup_in_user_input_is_printed_literally(capsys, name):
    code, _, err = run(["estimate", name, "h800", "--devices", "8"], capsys)
    assert code == 2 and name in err.replace("\n", "")


def test_json_failures_are_one_json_object(capsys):
    code, out, _ = run(["estimate", "no-such-model", "h800", "--devices", "8", "--json"], capsys)
    assert code == 2 and json.loads(out) == {"error": json.loads(out)["error"], "exit_code": 2}
    code, out, _ = run(["estimate", "qwen3-8b", "h800", "--devices", "eight", "--json"], capsys)
    assert code == 2 and json.loads(out)["exit_code"] == 2 and "--devices" in json.loads(out)["error"]


PLAN_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
GOOD_PLAN = {"xplan_plan": 1, "model": "qwen3-8b", "hardware": "h800", "devices": 8,
             "layout": {"fsdp": 8, "micro_batch": 1}, "training": {"seq_len": 4096, "global_batch": 8}}


@FUZZ
@given(key=st.sampled_from(["model", "hardware", "devices", "layout", "training", "typo_key"]), value=PLAN_VALUES)
def test_plan_files_with_any_value_load_or_say_why(tmp_path_factory, key, value):
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    path.write_text(yaml.safe_dump({**GOOD_PLAN, key: value}))
    try:
        load_plan(path)
    except InputError:
        pass


@FUZZ
@given(data=st.binary(max_size=200))
def test_plan_files_of_random_bytes_are_input_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    path.write_bytes(data)
    with pytest.raises(InputError):
        load_plan(path)


@pytest.mark.parametrize("text", ["[" * 50000, "a:\n" + "  " * 3 + "- " * 20000, "\udcff"])
def test_deeply_nested_or_odd_plans_exit_2(tmp_path, capsys, text):
    path = tmp_path / "plan.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    code, _, err = run(["whatif", path, "--json"], capsys)
    assert code == 2
@FUZZ
@given(data=st.binary(max_size=300))
def test_config_json_of_random_bytes_exits_2(tmp_path_factory, data):
    model = tmp_path_factory.mktemp("model")
    (model / "config.json").write_bytes(data)
    code = main(["inspect", str(model), "--json"])
    assert code == 2


@pytest.mark.parametrize("config, message", [
    ({"model_type": "qwen3", "num_hiden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
      "intermediate_size": 128, "vocab_size": 256}, "num_hiden_layers"),
    ({"model_type": "qwen3", "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
      "vocab_size": 256}, "hidden_size"),
    ({"model_type": "qwen3", "num_hidden_layers": 1_000_000, "hidden_size": 64, "num_attention_heads": 4,
      "intermediate_size": 128, "vocab_size": 256}, "num_hidden_layers"),
])
def test_config_json_mistakes_that_decide_the_size_exit_2(tmp_path, capsys, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, _, err = run(["inspect", tmp_path], capsys)
    assert code == 2 and message in err.replace("\n", "")
