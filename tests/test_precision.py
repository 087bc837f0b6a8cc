"""Precision: fp8 training through torchao, and what each precision reports it executed.

- `apply_fp8` swaps the decoder blocks' aligned linear layers for torchao `Float8Linear` with the
  plan's recipe, keeps the LM head, embedding, routers, norms and routed experts in bf16, and says so;
- a tiny Qwen3-MoE plan with `precision: fp8` runs on CPU through `xplan run` (torch._scaled_mm's
  CPU kernel): its 20-step losses stay within 2% of the bf16 run's, for both recipes, and the run
  JSON's `precision_executed` names the fp8 layers and the parts kept in bf16;
- fp8 without torchao is an input error; fp8 is not run on npu.
"""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from tests.test_run_cli import TINY_MOE, TRAINING, run_json
from xplan.errors import InputError
from xplan.layout import Layout, runtime_refusals
from xplan.plan import make_plan, save_plan

pytestmark = pytest.mark.usefixtures("one_thread")
LOSS_TOL = 0.02


def tiny_model():
    from xplan.runtime import build_model
    from xplan.runtime.models import model_config_from_dict

    return build_model(model_config_from_dict(dict(TINY_MOE), name="tiny"), dtype=torch.bfloat16, seed=0)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_apply_fp8_converts_block_linears_and_reports_the_rest(recipe):
    from torchao.float8.float8_linear import Float8Linear

    from xplan.runtime.precision import apply_precision

    model = tiny_model()
    executed = apply_precision(model, "fp8", recipe, "cpu").to_dict()
    fp8 = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert fp8 and all(".self_attn." in name for name in fp8)  # tiny MoE: attention projections only
    assert not isinstance(model.lm_head, Float8Linear)
    assert executed["fp8_recipe"] == recipe and executed["fp8_layer_count"] == len(fp8) == 8
    assert {"lm_head", "embedding", "router", "norms", "attention", "experts"} <= set(executed["kept_bf16"])
    ids = torch.randint(0, TINY_MOE["vocab_size"], (2, 16))
    model(ids).float().sum().backward()  # forward and backward through the fp8 GEMMs
    assert all(p.grad is not None for n, p in model.named_parameters() if "q_proj" in n)


def test_fp8_runs_and_tracks_bf16(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_MOE))
    runs = {}
    for name, precision, recipe in (("bf16", "bf16", "tensorwise"), ("fp8", "fp8", "tensorwise"),
                                    ("fp8 rowwise", "fp8", "rowwise")):
        lay = Layout(devices=1, precision=precision, kernels={"elementwise": "eager"})
        plan = save_plan(make_plan(str(model_dir), "cpu", lay, {**TRAINING, "fp8_recipe": recipe}),
                         tmp_path / f"{name.replace(' ', '_')}.yaml")
        runs[name] = run_json(plan, "--steps", 20)
    bf16 = runs["bf16"]["losses"]
    assert bf16[-1] < bf16[0]  # it trains
    for name in ("fp8", "fp8 rowwise"):
        losses = runs[name]["losses"]
        worst = max(abs(a - b) / b for a, b in zip(losses, bf16, strict=True))
        assert worst <= LOSS_TOL, f"{name}: 20-step losses differ from bf16's by up to {worst:.2%}"
        executed = runs[name]["precision_executed"]
        assert executed["precision"] == "fp8" and executed["fp8_layer_count"] == 8
        assert "lm_head" in executed["kept_bf16"] and "experts" in executed["kept_bf16"]
    assert runs["bf16"]["precision_executed"]["precision"] == "bf16"
    assert runs["bf16"]["precision_executed"]["fp8_layer_count"] == 0


def test_fp8_needs_torchao(monkeypatch):
    from xplan.runtime.precision import require_torchao

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name == "torchao" or name.startswith("torchao."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(InputError, match=r"pip install 'xplan\[fp8\]'"):
        require_torchao()


def test_fp8_runs_on_cpu_and_cuda_only():
    fp8 = Layout(devices=8, precision="fp8")
    assert runtime_refusals(fp8, "cuda") == [] and runtime_refusals(fp8, "cpu") == ["kernels.elementwise = fused "
                                                                                    "runs on cuda, npu only, not cpu"]
    assert "precision = fp8 runs on cpu, cuda only, not npu" in runtime_refusals(fp8, "npu")
