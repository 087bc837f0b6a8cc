"""Fixtures shared by several test modules."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny real models run faster on one thread: on 2 shared cores oversubscribed OpenMP threads
    are ~20x slower (and idle threads spin on a busy machine). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_MOE = {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 256, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> str:
    """A directory holding a tiny Qwen3-MoE config.json (cheap to trace and price)."""
    d = tmp_path_factory.mktemp("tiny_moe")
    (d / "config.json").write_text(json.dumps(TINY_MOE))
    return str(d)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A local config directory of the tiny InternVL-style model (tests/test_run_vlm.py: TINY_VLM)."""
    from tests.test_run_vlm import TINY_VLM

    path = tmp_path_factory.mktemp("tiny-internvl")
    (path / "config.json").write_text(json.dumps(TINY_VLM))
    return path


def value_paths(node, prefix=()):
    """Every key / index path into a parsed YAML or JSON document, the root left out (what the
    readers' fuzz tests mutate)."""
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from value_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from value_paths(v, (*prefix, i))
