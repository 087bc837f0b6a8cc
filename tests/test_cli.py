"""CLI contract: exit codes, --json output, helpful errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xplan.cli import main


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_models_json_lists_every_preset(capsys):
    code, out, _ = run(["models", "--json"], capsys)
    assert code == 0
    names = {m["name"] for m in json.loads(out)["models"]}
    assert {"qwen3-0.6b", "qwen3-8b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "kimi-k2",
            "gpt-oss-20b", "gpt-oss-120b", "llama3-8b", "llama3-70b", "llama3-405b"} <= names


def test_models_table(capsys):
    code, out, _ = run(["models"], capsys)
    assert code == 0 and "qwen3-235b-a22b" in out


def test_inspect_table(capsys):
    code, out, _ = run(["inspect", "qwen3-30b-a3b"], capsys)
    assert code == 0 and "active" in out


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "mamba", "hidden_size": 8}, "supported model_types are"),
        ({"model_type": "qwen3", "hidden_size": -4, "num_attention_heads": 2}, "hidden_size"),
        ({"model_type": "llama", "hidden_size": 384, "num_attention_heads": 6, "num_key_value_heads": 4,
          "num_hidden_layers": 2, "vocab_size": 64, "intermediate_size": 256}, "num_key_value_heads"),
        ({"model_type": "llama", "hidden_size": 384, "num_attention_heads": 6}, "lacks num_hidden_layers"),
    ],
)
def test_bad_config_exits_2_with_reason(config, message, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, err = run(["inspect", str(tmp_path)], capsys)
    assert code == 2
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_malformed_json_exits_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run(["inspect", str(tmp_path)], capsys)
    assert code == 2 and "cannot read" in err


def test_unknown_model_names_presets(capsys):
    code, _, err = run(["inspect", "qwen9-1t"], capsys)
    assert code == 2 and "qwen3-8b" in err


def test_bad_seq_len_exits_2(capsys):
    code, _, err = run(["inspect", "qwen3-8b", "--seq-len", "0"], capsys)
    assert code == 2 and "--seq-len" in err


def test_console_script_exit_code():
    proc = subprocess.run([sys.executable, "-c", "from xplan.cli import entry; entry()", "inspect", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown model" in proc.stderr and "Traceback" not in proc.stderr


def test_usage_error_exits_2(capsys):
    code, _, _ = run(["inspect"], capsys)
    assert code == 2
