"""Words for numbers: how two priced layouts differ, what decides between them, and why.

Everything here reads estimate dicts (`Estimate.to_dict()`, the `xplan estimate --json` object),
so `search`, `whatif` and `report` explain plans the same way.
"""

from __future__ import annotations

from typing import Any

from xplan.layout import knobs

# The layout fields shown for a plan, in table order (kernel slots by their own name): every knob.
LAYOUT_FIELDS = tuple(info.name for info in knobs() if info.name != "devices")
# Knobs left out of the "all rows" caption at their default (they apply to some models only).
QUIET_DEFAULTS = {"vision_recompute": "none"}
# Column headers where the name is long; the legend says what each stands for.
SHORT = {"dp_mode": "dp", "micro_batch": "mb", "recompute": "rc", "offload": "off", "tile_tokens": "tile",
         "keep_gathered": "kept", "allocator": "alloc", "precision": "prec", "tp_comm": "tp comm", "attention": "attn",
         "moe_gemm": "moe gemm", "elementwise": "eltw", "ep_overlap": "ep a2a", "grad_dtype": "grads",
         "fsdp_buffers": "fsdp bufs", "vision_recompute": "vrc"}
OFFLOAD_SHORT = {"optimizer": "opt", "params": "params", "activations": "act"}
LEGEND = ("dp = data-parallel mode, mb = micro-batch, rc = recompute (vrc: the vision tower's), off = "
          "offload (opt = optimizer states, act = activations), tile = tokens per feed-forward tile, kept = blocks "
          "kept gathered, prec = precision, eltw = elementwise kernels")

# Step-time components (estimate `time_s` keys): what each is, and which kind of time it is.
TIME_WORDS = {
    "compute": "compute", "recompute": "recompute", "fsdp_exposed": "exposed FSDP all-gather/reduce-scatter",
    "fsdp_copies": "FSDP copies", "expert_all_to_all": "expert all-to-all", "ulysses_all_to_all":
    "Ulysses all-to-all", "tensor_parallel": "tensor-parallel collectives", "pipeline_p2p": "pipeline sends",
    "pipeline_bubble": "pipeline bubble", "optimizer": "optimizer step", "offload": "activation offload traffic",
    "host_bound": "host-bound kernel launches",
}
TIME_KIND = {
    "compute": "compute", "recompute": "compute", "fsdp_copies": "compute", "optimizer": "compute",
    "fsdp_exposed": "communication", "expert_all_to_all": "communication", "ulysses_all_to_all": "communication",
    "tensor_parallel": "communication", "pipeline_p2p": "communication", "offload": "communication",
    "pipeline_bubble": "idle", "host_bound": "idle",
}
# Exposed communication by kind (the time keys that are waits on a link).
COMM_KINDS = {"fsdp_exposed": "FSDP", "expert_all_to_all": "EP all-to-all", "ulysses_all_to_all":
              "Ulysses all-to-all", "tensor_parallel": "TP", "pipeline_p2p": "PP send/recv",
              "offload": "host link (offload)"}
MEMORY_COMPONENTS = ("parameters", "gradients", "optimizer", "gathered_parameters", "activations", "logits_loss",
                     "temporaries", "overhead")


def secs(value: float, signed: bool = False) -> str:
    """Seconds at a readable scale: '18.26 s', '0.412 s', '3.1 ms', '25 us'."""
    sign = "+" if signed and value >= 0 else ""
    size = abs(value)
    if size >= 1 or size == 0:
        return f"{sign}{value:.2f} s"
    if size >= 0.01:
        return f"{sign}{value:.3f} s"
    if size >= 1e-5:
        return f"{sign}{value * 1e3:.2g} ms" if size >= 1e-3 else f"{sign}{value * 1e6:.3g} us"
    return f"{sign}{value * 1e6:.2g} us"


def gib(value: float, signed: bool = False) -> str:
    """GiB at a readable scale: '74.5 GiB', '3.2 MiB'."""
    sign = "+" if signed and value >= 0 else ""
    if abs(value) >= 0.1 or value == 0:
        return f"{sign}{value:.1f} GiB"
    return f"{sign}{value * 1024:.3g} MiB"


def flat_layout(layout: dict[str, Any]) -> dict[str, Any]:
    """The knobs of a layout dict with the kernel slots lifted to the top level."""
    flat = {k: v for k, v in layout.items() if k != "kernels"}
    flat.update(layout.get("kernels", {}))
    return {name: flat.get(name) for name in LAYOUT_FIELDS}


def show(name: str, value: Any, short: bool = False) -> str:
    """One knob value as text ("none" for no offload; offload kinds joined by "+")."""
    if name == "offload":
        kinds = list(value or ())
        return "+".join(OFFLOAD_SHORT[k] if short else k for k in kinds) or "none"
    if name == "tile_tokens" and value is None:
        return "none"
    if name == "keep_gathered":
        return "+".join(value or ()) or "none"
    return str(value)


def differing_fields(layouts: list[dict[str, Any]]) -> list[str]:
    """Layout fields whose value is not the same in every layout (table order)."""
    flats = [flat_layout(lay) for lay in layouts]
    return [name for name in LAYOUT_FIELDS if len({repr(f[name]) for f in flats}) > 1]


def common_fields(layouts: list[dict[str, Any]]) -> dict[str, Any]:
    """Layout fields with one value across all layouts."""
    flats = [flat_layout(lay) for lay in layouts]
    differ = set(differing_fields(layouts))
    return {name: flats[0][name] for name in LAYOUT_FIELDS
            if name not in differ and QUIET_DEFAULTS.get(name, ...) != flats[0][name]} if flats else {}


def layout_changes(base: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """["ep 1 → 2", "offload params → none", ...]: what `other` changes relative to `base`."""
    a, b = flat_layout(base), flat_layout(other)
    return [f"{name} {show(name, a[name])} → {show(name, b[name])}" for name in LAYOUT_FIELDS if a[name] != b[name]]


def decisive(chosen: dict[str, Any], other: dict[str, Any]) -> tuple[str, float]:
    """The step-time component that differs most between two estimates (other − chosen, seconds)."""
    keys = set(chosen["time_s"]) | set(other["time_s"])
    deltas = {k: other["time_s"].get(k, 0.0) - chosen["time_s"].get(k, 0.0) for k in keys}
    step_delta = other["step_time_s"] - chosen["step_time_s"]
    # The component moving the same way as the step time, by size (a faster alternative: the one that fell most).
    sign = 1.0 if step_delta >= 0 else -1.0
    key = max(sorted(deltas), key=lambda k: sign * deltas[k])
    return key, deltas[key]


def memory_decisive(chosen: dict[str, Any], other: dict[str, Any]) -> tuple[str, float]:
    """The memory component that differs most (other − chosen, GiB)."""
    deltas = {k: other["memory_gib"].get(k, 0.0) - chosen["memory_gib"].get(k, 0.0) for k in MEMORY_COMPONENTS}
    key = max(sorted(deltas), key=lambda k: abs(deltas[k]))
    return key, deltas[key]


def separation(chosen: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """What separates `other` from `chosen`: layout changes, throughput and memory deltas, and the
    step-time and memory components that move most."""
    key, delta = decisive(chosen, other)
    mkey, mdelta = memory_decisive(chosen, other)
    speed = other["tokens_per_s_per_device"] / chosen["tokens_per_s_per_device"] - 1.0
    memory = other["memory_gib"]["allocated"] - chosen["memory_gib"]["allocated"]
    text = f"{speed:+.1%} tokens/s/device, {gib(memory, True)} peak; {TIME_WORDS.get(key, key)} {secs(delta, True)}/step"
    if mdelta and abs(mdelta) >= 0.001 * max(1.0, abs(memory)):
        text += f", {mkey} {gib(mdelta, True)}"
    return {"changes": layout_changes(chosen["layout"], other["layout"]), "tokens_per_s_change": speed,
            "peak_gib_change": memory, "decisive_time": key, "decisive_time_delta_s": delta,
            "decisive_memory": mkey, "decisive_memory_delta_gib": mdelta, "summary": text}


def memory_margin(est: dict[str, Any], headroom_gib: float = 0.0) -> str:
    mem = est["memory_gib"]
    free = mem["capacity"] - mem["allocated"]
    per = "rank (one die)" if est["layout"].get("ranks_per_device", 1) > 1 else "device"
    text = (f"peaks at {gib(mem['allocated'])} allocated of {mem['capacity']:.0f} GiB per {per} ({gib(free)} free; "
            f"{gib(mem['total'])} reserved with the allocator's overhead")
    if headroom_gib:
        text += f"; {gib(headroom_gib)} headroom was required"
    return text + ")"


def explain_choice(plans: list[dict[str, Any]], headroom_gib: float = 0.0) -> list[str]:
    """Sentences on why plans[0] won: the runner-up, the decisive difference, the memory margin."""
    if not plans:
        return []
    best = plans[0]
    lines = []
    if len(plans) > 1:
        runner = plans[1]
        sep = separation(best, runner)
        lead = best["tokens_per_s_per_device"] / runner["tokens_per_s_per_device"] - 1.0
        key, delta = sep["decisive_time"], sep["decisive_time_delta_s"]
        step_delta = runner["step_time_s"] - best["step_time_s"]
        lines.append(
            f"Why #1: {best['tokens_per_s_per_device']:,.0f} tokens/s/device, {lead:.1%} more than the runner-up #2 "
            f"({runner['tokens_per_s_per_device']:,.0f}), which changes {', '.join(sep['changes']) or 'nothing'}.")
        lines.append(
            f"Decisive: #2 spends {secs(delta, True)}/step on {TIME_WORDS.get(key, key)} (of {secs(step_delta, True)}"
            f"/step in all); it peaks at {gib(runner['memory_gib']['allocated'])} against #1's "
            f"{gib(best['memory_gib']['allocated'])}.")
    else:
        lines.append("Only one layout fits.")
    mem = best["memory_gib"]
    free = mem["capacity"] - mem["allocated"]
    margin = f"#1 {memory_margin(best, headroom_gib)}; binding: {best['binding']}."
    if free < 0.1 * mem["capacity"] and not headroom_gib:
        margin += " Pass --headroom (GiB, or a fraction of the device memory) to keep more free."
    lines.append(margin)
    return lines


def selective_note(activation_bytes: dict[str, dict[str, float]], trace=None) -> str | None:
    """Why a block may keep more bytes under selective recompute than under none (`xplan inspect`).

    Selective recompute saves every matmul and attention output (op-level SAC); plain autograd
    keeps only what each op's backward needs. Where a block's matmuls produce tensors its backward
    does not keep (the blockwise attention path's per-block scores), selective keeps more. With
    `trace` the largest such outputs are named."""
    worse = [g for g, by in activation_bytes.items() if by.get("selective", 0) > by.get("none", 0) * 1.001]
    if not worse:
        return None
    detail = ""
    if trace is not None:
        group = max(worse, key=lambda g: activation_bytes[g]["selective"] - activation_bytes[g]["none"])
        extra: dict[str, float] = {}
        for _, a in trace.graph.nodes(data=True):
            if a.get("type") == "op" and a.get("stage") == group and a.get("phase") == "forward" \
                    and a.get("selective_saved") and not a.get("saved_bytes"):
                key = f"{a['op']} outputs in {a.get('module') or group}"
                extra[key] = extra.get(key, 0.0) + a.get("bytes_written", 0) / trace.tokens
        top = sorted(extra.items(), key=lambda kv: -kv[1])[:2]
        if top:
            detail = (f" In {group} the largest are " + " and ".join(f"{k} ({v / 1024:.3g} KiB/token)" for k, v in top)
                      + ", which plain autograd does not keep.")
    return (f"selective keeps more than none for {', '.join(worse)}: the op-level policy saves every matmul and "
            "attention output so that backward need not redo them, including outputs the backward of 'none' does "
            "not need (e.g. the per-block score matmuls of the blockwise attention path, which 'none' rebuilds in "
            f"backward).{detail} For this model prefer none where it fits, else full; search prices all three.")
