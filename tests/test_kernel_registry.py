"""The kernel registry (runtime/kernels): it agrees with the layout's `runs` metadata, selects per
device type and module what the registry table says, reports what runs (`kernels_executed`), and a
choice the device does not run is refused with exit 2 before any process starts."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from tests.test_distributed import CONFIGS, make_config
from xplan.cli import main
from xplan.layout import DEVICE_TYPES, Kernels, Layout, layout_from_dict, runtime_refusals
from xplan.plan import make_plan, save_plan
from xplan.runtime import build_model
from xplan.runtime.kernels import (
    CHOICES,
    IMPLEMENTATIONS,
    REGISTRY_SLOTS,
    apply_kernels,
    describe,
    layout_runs,
)
from xplan.runtime.kernels.attention import AttentionCase, attention_accepts
from xplan.runtime.kernels.registry import STAND_IN, candidates, select

TRAINING = {"seq_len": 16, "global_batch": 4, "steps": 2, "seed": 0}


def test_layout_declares_what_the_registry_runs():
    declared = {slot: info.json_schema_extra["runs"] for slot, info in Kernels.model_fields.items()}
    assert set(declared) == set(layout_runs())
    for slot, choices in layout_runs().items():
        assert {choice: tuple(devices) for choice, devices in declared[slot].items()} == choices, slot


def test_every_listed_implementation_exists_and_runs_where_listed():
    for plan_slot, choices in CHOICES.items():
        for choice, slots in choices.items():
            for registry_slot, by_device in slots.items():
                assert registry_slot in REGISTRY_SLOTS
                for device, names in by_device.items():
                    assert device in DEVICE_TYPES and names, (plan_slot, choice, registry_slot)
                    for name in names:
                        impl = IMPLEMENTATIONS[(registry_slot, name)]
                        assert device in impl.devices, (name, device)
                    # The last candidate is the fallback: it must take every module (the choice's own
                    # single implementation excepted: chunked loss, compiled blocks, flex_attention).
                    assert "always" in IMPLEMENTATIONS[(registry_slot, names[-1])].needs or \
                        names == (choice,) or names[-1] == "torch.compile(blocks)" or \
                        (plan_slot, choice, names) == ("attention", "flex", ("flex_attention",)), names
    for slot, name in STAND_IN.items():
        assert "cpu" in IMPLEMENTATIONS[(slot, name)].devices
    assert any(row["runs"].startswith("refused") for row in describe())


def case(device="cuda", dtype=torch.bfloat16, qk=64, v=64, window=None, sinks=False) -> AttentionCase:
    return AttentionCase(device, dtype, 8, qk, v, window, sinks)


@pytest.mark.parametrize("attention_case, usable, expected", [
    (case(), {"sdpa(flash backend)"}, "sdpa(flash backend)"),
    (case(dtype=torch.float32), {"sdpa(memory-efficient backend)"}, "sdpa(memory-efficient backend)"),
    (case(), {"sdpa(cudnn backend)"}, "sdpa(cudnn backend)"),
    (case(window=128, sinks=True), set(), "flex_attention"),  # GPT-OSS sliding layer
    (case(sinks=True), {"sdpa(flash backend)"}, "flex_attention"),  # GPT-OSS full layer
    (case(qk=192, v=128), {"sdpa(memory-efficient backend)"}, "flex_attention"),  # DeepSeek MLA
    (case(), set(), "blockwise"),  # no SDPA backend takes it: the fallback
])
def test_flash_on_cuda_picks_a_fused_kernel_per_module(attention_case, usable, expected, monkeypatch):
    import xplan.runtime.kernels.flex as flex

    monkeypatch.setattr(flex, "flex_available", lambda device: device == "cuda")

    def accepts(name):
        return attention_accepts(name, attention_case, backend_check=lambda n, c: n in usable)

    assert select("attention", "flash", "attention", "cuda", accepts) == expected


def test_other_choices_select_as_declared():
    plain, sinks, mla = case(device="cpu"), case(device="cpu", sinks=True, window=4), case(device="cpu", qk=24, v=16)
    for c, expected in ((plain, "sdpa"), (sinks, "blockwise"), (mla, "blockwise")):
        assert select("attention", "sdpa", "attention", "cpu", lambda n, c=c: attention_accepts(n, c)) == expected
    assert select("attention", "sdpa", "attention", "cuda",
                  lambda n: attention_accepts(n, case(qk=24, v=16))) == "sdpa"  # CUDA's SDPA takes MLA widths
    assert select("attention", "eager", "attention", "npu") == "eager"
    assert candidates("attention", "flash", "attention", "cpu") == ("blockwise",)  # dry-run stand-in
    npu = case(device="npu")  # torch_npu is not installed here: the fallback
    assert select("attention", "flash", "attention", "npu", lambda n: attention_accepts(n, npu)) == "blockwise"


@pytest.mark.parametrize("kind, attention, expected", [
    ("qwen3_moe", "sdpa", "sdpa"),
    ("qwen3_moe", "eager", "eager"),
    ("gpt_oss", "sdpa", "blockwise"),  # sinks and windows: SDPA cannot take them on CPU
    ("deepseek_v3", "sdpa", "blockwise"),  # MLA: value width unlike the query width, on CPU
])
def test_apply_reports_what_runs_on_cpu(kind, attention, expected):
    model = build_model(make_config(kind))
    layout = Layout(devices=1, fsdp=1, precision="fp32", kernels={"attention": attention, "elementwise": "eager"})
    executed = apply_kernels(model, layout, "cpu")
    assert set(executed) == set(REGISTRY_SLOTS)
    assert executed["attention"] == expected
    assert executed["permute"] == "torch" and executed["norm"] == "torch_rmsnorm"
    assert executed["moe_gemm"] in ("grouped_mm", "loop") and executed["elementwise"] == "eager"
    attention_modules = [m for m in model.modules() if hasattr(m, "attention_kernel")]
    assert all((m.attention_kernel is None) == (executed["attention"] == "sdpa") for m in attention_modules)


def test_apply_on_cuda_puts_triton_kernels_on_modules():
    """Selection only (no GPU needed): the modules get the Triton permuter and RMSNorm."""
    model = build_model(make_config("qwen3_moe"))
    layout = Layout(devices=1, fsdp=1, precision="bf16")  # elementwise fused, moe_gemm grouped_mm
    executed = apply_kernels(model, layout, "cuda", triton_ok=lambda: True)
    assert executed["permute"] == "triton" and executed["norm"] == "triton_rmsnorm"
    assert executed["elementwise"] == "torch.compile(blocks)"
    assert all(m.token_permuter is not None for m in model.modules() if hasattr(m, "token_permuter"))
    eager = Layout(devices=1, fsdp=1, precision="bf16", kernels={"elementwise": "eager", "moe_gemm": "loop"})
    executed = apply_kernels(model, eager, "cuda", triton_ok=lambda: True)
    assert executed["permute"] == "torch" and executed["norm"] == "torch_rmsnorm" and executed["moe_gemm"] == "loop"
    assert all(m.token_permuter is None for m in model.modules() if hasattr(m, "token_permuter"))


def test_dense_model_reports_no_moe():
    from xplan.runtime.models import model_config_from_dict

    config = dict(CONFIGS["qwen3_moe"], model_type="qwen3")
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
        config.pop(key)
    model = build_model(model_config_from_dict(config, name="tiny-qwen3"))
    executed = apply_kernels(model, Layout(devices=1, fsdp=1, kernels={"elementwise": "eager"}), "cpu")
    assert executed["moe_gemm"] == executed["permute"] == "none (no MoE layers)"


# ---------------------------------------------------------------- `xplan run`: refused before spawning

def xplan(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt-oss")
    (path / "config.json").write_text(json.dumps(CONFIGS["gpt_oss"]))
    return path


@pytest.mark.parametrize("attention, message", [
    ("flash", "kernels.attention = flash runs on cuda, npu only, not cpu"),
    ("flash1", "kernels.attention = flash1 is priced only"),
    ("flex", "kernels.attention = flex runs on cuda only, not cpu"),  # torch has no flex backward on CPU
])
def test_attention_the_device_does_not_run_exits_2_before_spawning(model_dir, tmp_path, monkeypatch, attention,
                                                                   message):
    import torch.multiprocessing

    def no_spawn(*args, **kwargs):
        raise AssertionError("a worker was spawned")

    monkeypatch.setattr(torch.multiprocessing, "spawn", no_spawn)
    monkeypatch.setattr(torch.multiprocessing, "start_processes", no_spawn)
    layout = layout_from_dict({"devices": 2, "precision": "fp32",
                               "kernels": {"attention": attention, "elementwise": "eager"}})
    assert runtime_refusals(layout, "cpu")
    plan = save_plan(make_plan(str(model_dir), "cpu", layout, TRAINING), tmp_path / "plan.yaml")
    code, out, err = xplan("run", plan)
    assert code == 2, (out, err)
    assert message in " ".join(err.split()) and "Traceback" not in err


def test_flex_choice_runs_flex_attention_for_every_layer_on_cuda_only():
    plain = AttentionCase("cuda", torch.bfloat16, 8, 64, 64, None, False, 8)
    sinks = AttentionCase("cuda", torch.bfloat16, 8, 64, 64, 128, True, 2)
    mla = AttentionCase("cuda", torch.bfloat16, 8, 192, 128, None, False, 8)
    for case in (plain, sinks, mla):
        assert select("attention", "flex", "attention", "cuda", lambda n, c=case: attention_accepts(n, c)) \
            == "flex_attention"
    assert candidates("attention", "flex", "attention", "cpu") == ("blockwise",)  # dry runs' stand-in
    layout = layout_from_dict({"devices": 2, "kernels": {"attention": "flex"}})
    assert runtime_refusals(layout, "cuda") == [] and runtime_refusals(layout, "npu")
