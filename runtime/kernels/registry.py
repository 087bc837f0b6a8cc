"""The kernel registry: per kernel slot, the implementations the runtime has on each device type,
what each needs, and what runs when a module does not meet that.

Two levels of slot:
- a *plan slot* is a field of `xplan.layout.Kernels` (attention, moe_gemm, loss, elementwise): the
  plan names one *choice* for each;
- a *registry slot* is one place in the model where a kernel runs: attention, moe_gemm, permute
  (MoE token permutation and unpermutation), loss, norm (RMSNorm) and elementwise (the other
  elementwise chains of a block). A plan choice picks the implementation of its own registry slot
  and, for moe_gemm and elementwise, of a companion one (permute, norm).

`CHOICES[plan slot][choice][registry slot][device type]` lists implementations in order of
preference: a module gets the first whose needs it meets (checked by the slot's selector, e.g.
`attention.attention_accepts`); the last entry always applies (the fallback). A choice *runs* on the
device types its own registry slot lists; on any other device type the runtime refuses it before a
process starts, through `xplan.layout.runtime_refusals`, whose `runs` metadata must equal
`layout_runs()` (tests/test_kernel_registry.py checks it).

Dry runs and traces execute on CPU fake tensors whatever the plan's device: there a choice that
does not run on CPU is stood in for by `STAND_IN[registry slot]` (the same tensors saved for
backward as the fused kernels it stands for, or the unfused one itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ALL = ("cpu", "cuda", "npu")
CUDA = ("cuda",)
NPU = ("npu",)


@dataclass(frozen=True)
class Implementation:
    name: str  # what a run reports in `kernels_executed`
    slot: str  # registry slot
    devices: tuple[str, ...]
    needs: str  # when it applies, in words (the slot's selector checks exactly this)
    source: str  # where the code is


IMPLEMENTATIONS: dict[tuple[str, str], Implementation] = {(impl.slot, impl.name): impl for impl in (
    # attention
    Implementation("sdpa", "attention", ALL,
                   "plain causal attention (no sinks, no window); query and value widths equal, or CUDA",
                   "torch.nn.functional.scaled_dot_product_attention, backend chosen by torch"),
    Implementation("sdpa(flash backend)", "attention", CUDA,
                   "plain causal; what torch's flash check accepts (CUDA: fp16/bf16, equal query and value "
                   "widths <= 256, sm80+); kv heads unrepeated where it takes GQA",
                   "runtime/kernels/attention.py via torch.nn.attention.sdpa_kernel"),
    Implementation("sdpa(cudnn backend)", "attention", CUDA,
                   "plain causal; fp16/bf16; what torch's cuDNN check accepts",
                   "runtime/kernels/attention.py via torch.nn.attention.sdpa_kernel"),
    Implementation("sdpa(memory-efficient backend)", "attention", CUDA,
                   "plain causal; any float dtype; what torch's memory-efficient check accepts",
                   "runtime/kernels/attention.py via torch.nn.attention.sdpa_kernel"),
    Implementation("flex_attention", "attention", CUDA,
                   "what the SDPA backends do not take: a sliding window, sinks (through its log-sum-exp) "
                   "or unequal query/value widths; compiled with torch.compile (no CPU backward in torch 2.13)",
                   "runtime/kernels/flex.py"),
    Implementation("npu_fusion_attention", "attention", NPU,
                   "plain causal, fp16/bf16, equal query and value widths; torch_npu installed "
                   "(untested: no NPU where the tests run)",
                   "runtime/kernels/npu.py"),
    Implementation("eager", "attention", ALL,
                   "always: unfused matmul, masked fp32 softmax (sinks as an extra column), matmul; keeps "
                   "[batch, heads, seq, seq] probabilities for backward",
                   "runtime/kernels/attention.py: eager_attention"),
    Implementation("blockwise", "attention", ALL,
                   "always: exact attention a block of queries at a time (sinks, windows, unequal widths)",
                   "runtime/models/blockwise_attention.py"),
    # MoE expert GEMMs
    Implementation("grouped_mm", "moe_gemm", ALL,
                   "torch._grouped_mm present; expert weight rows 16-byte aligned in the compute dtype",
                   "runtime/models/grouped.py: grouped_linear_mm"),
    Implementation("loop", "moe_gemm", ALL, "always: one matmul per expert (counts read on the host)",
                   "runtime/models/grouped.py: grouped_linear_loop"),
    # MoE token permutation
    Implementation("triton", "permute", CUDA,
                   "Triton available: expert counts, stable ranks and the row gather in two kernels; "
                   "weighted unpermute as a gather-sum (deterministic, no atomics)",
                   "runtime/kernels/triton_permute.py"),
    Implementation("torch", "permute", ALL, "always: argsort, histc, index and index_put",
                   "runtime/models/moe.py: MoE.dispatch / combine"),
    # loss
    Implementation("chunked", "loss", ALL, "no LM-head bias: LM head and cross-entropy by token chunks",
                   "runtime/train/loss.py"),
    Implementation("full", "loss", ALL, "always: full logits, then cross-entropy", "runtime/train/loss.py"),
    # RMSNorm
    Implementation("triton_rmsnorm", "norm", CUDA,
                   "Triton available; forward and backward one kernel each, saving the input and one fp32 "
                   "rstd per row", "runtime/kernels/triton_rmsnorm.py"),
    Implementation("torch_rmsnorm", "norm", ALL, "always: fp32 normalise, scale in the input dtype",
                   "runtime/models/layers.py: RMSNorm"),
    # the block's other elementwise chains
    Implementation("torch.compile(blocks)", "elementwise", ("cuda", "npu"),
                   "each decoder block compiled after the parallelisms", "runtime/train/parallel.py: compile_blocks"),
    Implementation("eager", "elementwise", ALL, "always: one kernel per op", "torch"),
)}


def _on(devices: tuple[str, ...], *names: str) -> dict[str, tuple[str, ...]]:
    return {device: names for device in devices}


PLAIN_SDPA_BACKENDS = ("sdpa(flash backend)", "sdpa(cudnn backend)", "sdpa(memory-efficient backend)")

# plan slot -> choice -> registry slot -> device type -> implementations, preferred first.
CHOICES: dict[str, dict[str, dict[str, dict[str, tuple[str, ...]]]]] = {
    "attention": {
        # torch's default dispatch where SDPA takes the case; the blockwise path for the rest.
        "sdpa": {"attention": _on(ALL, "sdpa", "blockwise")},
        "eager": {"attention": _on(ALL, "eager")},
        # Fused kernels: an explicit SDPA backend for plain causal attention, flex_attention for
        # windows, sinks and MLA's unequal widths (CUDA); npu_fusion_attention on Ascend.
        "flash": {"attention": {"cuda": ("flex_attention", *PLAIN_SDPA_BACKENDS, "blockwise"),
                                "npu": ("npu_fusion_attention", "blockwise")}},
        # flex_attention for every layer, plain causal included (CUDA only: no CPU backward in torch 2.13).
        "flex": {"attention": {"cuda": ("flex_attention",)}},
        "flash1": {"attention": {}},  # FlashAttention-1: no implementation here; priced for old stacks
    },
    "moe_gemm": {
        "grouped_mm": {"moe_gemm": _on(ALL, "grouped_mm", "loop"),
                       "permute": {"cuda": ("triton", "torch"), "cpu": ("torch",), "npu": ("torch",)}},
        "loop": {"moe_gemm": _on(ALL, "loop"), "permute": _on(ALL, "torch")},
    },
    "loss": {
        "chunked": {"loss": _on(ALL, "chunked")},
        "full": {"loss": _on(ALL, "full")},
        "fused": {"loss": {}},  # one fused cross-entropy kernel (TE / Megatron): priced, not run
    },
    # RMSNorm: `auto` runs what the elementwise choice picks (apply_kernels selects it through the
    # elementwise slot); `fused` (a fused norm beside eager elementwise ops) is priced, not run.
    "norm": {
        "auto": {"norm": {"cuda": ("triton_rmsnorm", "torch_rmsnorm"), "cpu": ("torch_rmsnorm",),
                          "npu": ("torch_rmsnorm",)}},
        "fused": {"norm": {}},
    },
    "elementwise": {
        "fused": {"elementwise": _on(("cuda", "npu"), "torch.compile(blocks)"),
                  "norm": {"cuda": ("triton_rmsnorm", "torch_rmsnorm"), "npu": ("torch_rmsnorm",)}},
        "eager": {"elementwise": _on(ALL, "eager"), "norm": _on(ALL, "torch_rmsnorm")},
    },
}

# What dry runs (CPU fake tensors) run for a choice that does not run on CPU.
STAND_IN = {"attention": "blockwise", "elementwise": "eager", "norm": "torch_rmsnorm", "permute": "torch",
            "moe_gemm": "grouped_mm", "loss": "chunked"}


def layout_runs() -> dict[str, dict[str, tuple[str, ...]]]:
    """{plan slot: {choice: device types it runs on}}: what `xplan.layout.Kernels` must declare."""
    return {slot: {choice: tuple(d for d in ALL if d in slots.get(slot, {}))
                   for choice, slots in choices.items()}
            for slot, choices in CHOICES.items()}


def candidates(plan_slot: str, choice: str, registry_slot: str, device_type: str) -> tuple[str, ...]:
    """Implementations of `registry_slot` for the plan's `choice` on `device_type`, preferred first
    (the stand-in alone where the choice does not run on this device type: dry runs)."""
    by_device = CHOICES[plan_slot][choice].get(registry_slot, {})
    return by_device.get(device_type) or (STAND_IN[registry_slot],)


def select(plan_slot: str, choice: str, registry_slot: str, device_type: str,
           accepts: Callable[[str], bool] = lambda name: True) -> str:
    """The first candidate `accepts` takes; the last one whatever it says (the fallback)."""
    names = candidates(plan_slot, choice, registry_slot, device_type)
    return next((name for name in names[:-1] if accepts(name)), names[-1])


def describe() -> list[dict[str, str]]:
    """One row per (plan slot, choice, registry slot, device type): the table in docs/extending.md."""
    rows = []
    for plan_slot, choices in CHOICES.items():
        for choice, slots in choices.items():
            if not slots.get(plan_slot):
                rows.append({"plan": f"{plan_slot}: {choice}", "slot": plan_slot, "device": "-",
                             "runs": "refused (priced only)"})
            for registry_slot, by_device in slots.items():
                for device, names in by_device.items():
                    rows.append({"plan": f"{plan_slot}: {choice}", "slot": registry_slot, "device": device,
                                 "runs": " > ".join(names)})
    return rows
