"""The parallel layout: one object owns every decision (XTuner-style knobs, one place).

Rank arithmetic, used the same way by the cost models, the search and the runtime:

    devices = tp * pp * dp_world            (dp_world: ranks that hold one model slice)
    dp_world = sp * data_parallel           (sp ranks split one sequence, Ulysses)
    dp_world = fsdp * hsdp_replicas         (dense weights sharded over `fsdp` ranks)
    fsdp     = ep * expert_fsdp             (routed experts split over `ep`, then sharded)
    fsdp == 1: no per-micro-batch sharding; optimizer states sharded over dp_world (ZeRO-1)

Gradient accumulation follows from the global batch:
    global_batch = data_parallel * micro_batch * grad_accum   (sequences)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from xplan.errors import InputError

RECOMPUTE_MODES = ("none", "selective", "full")
OFFLOAD_KINDS = ("optimizer", "params", "activations")
PRECISIONS = ("fp32", "bf16", "fp8")
KERNEL_CHOICES = {
    # flash: the fused FlashAttention kernel of the profile's fit; flash1: FlashAttention-1 (older
    # stacks); sdpa: torch's scaled_dot_product_attention.
    "attention": ("sdpa", "eager", "flash", "flash1"),
    "moe_gemm": ("grouped_mm", "loop"),
    "loss": ("full", "chunked"),
    # fused: chains of elementwise ops run as one kernel (torch.compile of each block on
    # accelerators); eager: one kernel per aten op.
    "elementwise": ("fused", "eager"),
    # Tensor-parallel collectives: exposed on the critical path, or overlapped with the layer's
    # GEMMs as Megatron's --tp-comm-overlap (Transformer Engine userbuffers) pipelines them.
    "tp_comm": ("exposed", "overlapped"),
}
DEFAULT_KERNELS = {"attention": "sdpa", "moe_gemm": "grouped_mm", "loss": "chunked", "elementwise": "fused",
                   "tp_comm": "exposed"}


def recompute_policies(recompute: str | float, num_blocks: int) -> list[str]:
    """Policy of each block in order: the mode for all, or for a fraction f the first
    ceil(f x blocks) fully recomputed and the rest none (the runtime and the cost model)."""
    if isinstance(recompute, str):
        return [recompute] * num_blocks
    count = min(num_blocks, math.ceil(recompute * num_blocks - 1e-9))
    return ["full"] * count + ["none"] * (num_blocks - count)


def parse_recompute(value: Any) -> str | float:
    """'none' | 'selective' | 'full' | a fraction of blocks in [0, 1] fully recomputed."""
    if isinstance(value, str) and value in RECOMPUTE_MODES:
        return value
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise InputError(
            f"recompute must be one of {', '.join(RECOMPUTE_MODES)} or a fraction of layers in [0, 1], got {value!r}."
        ) from None
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"recompute fraction must be in [0, 1], got {fraction}.")
    return "none" if fraction == 0 else "full" if fraction == 1 else fraction


def parse_offload(value: Any) -> tuple[str, ...]:
    """'none', a comma-separated string, or a list of offload kinds."""
    if value is None or value == "none" or value == []:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip() and str(i).strip() != "none"]
    bad = [i for i in items if i not in OFFLOAD_KINDS]
    if bad:
        raise InputError(f"offload must be 'none' or a comma-separated subset of {', '.join(OFFLOAD_KINDS)}; "
                         f"got {', '.join(bad)}.")
    return tuple(k for k in OFFLOAD_KINDS if k in items)


@dataclass(frozen=True)
class Layout:
    devices: int
    fsdp: int
    ep: int = 1
    sp: int = 1
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    micro_batch: int = 1
    recompute: str | float = "none"
    offload: tuple[str, ...] = ()
    precision: str = "bf16"
    kernels: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_KERNELS))

    @property
    def dp_world(self) -> int:
        return self.devices // (self.tp * self.pp)

    @property
    def data_parallel(self) -> int:
        """Distinct micro-batches processed at once (sequence-parallel ranks share one)."""
        return self.dp_world // self.sp

    @property
    def hsdp_replicas(self) -> int:
        return self.dp_world // self.fsdp

    @property
    def expert_fsdp(self) -> int:
        return max(1, self.fsdp // self.ep)

    @property
    def zero1(self) -> bool:
        """fsdp == 1: parameters and gradients replicated, optimizer states sharded over the
        data-parallel ranks (Megatron's distributed optimizer); gathered once per step."""
        return self.fsdp == 1

    def recompute_policies(self, num_blocks: int) -> list[str]:
        return recompute_policies(self.recompute, num_blocks)

    def recompute_fraction(self) -> float:
        """Share of blocks that are fully recomputed ('selective' counts as 0 here)."""
        if isinstance(self.recompute, float):
            return self.recompute
        return 1.0 if self.recompute == "full" else 0.0

    def grad_accum(self, global_batch: int) -> int:
        per_step = self.data_parallel * self.micro_batch
        if global_batch % per_step:
            raise InputError(
                f"global batch {global_batch} is not a multiple of data_parallel ({self.data_parallel}) × "
                f"micro_batch ({self.micro_batch}) = {per_step}; change --global-batch or --micro-batch."
            )
        return global_batch // per_step

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["offload"] = list(self.offload)
        out.update(dp_world=self.dp_world, data_parallel=self.data_parallel,
                   hsdp_replicas=self.hsdp_replicas, expert_fsdp=self.expert_fsdp)
        return out

    def with_changes(self, **changes: Any) -> Layout:
        return replace(self, **changes)


DERIVED_FIELDS = ("dp_world", "data_parallel", "hsdp_replicas", "expert_fsdp")


def layout_from_dict(data: dict[str, Any]) -> Layout:
    """Build and type-check a Layout from a plain dict (derived fields are ignored)."""
    known = {f for f in Layout.__dataclass_fields__}
    unknown = sorted(set(data) - known - set(DERIVED_FIELDS))
    if unknown:
        raise InputError(f"unknown layout key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    values = {k: v for k, v in data.items() if k in known}
    for key in ("devices", "fsdp", "ep", "sp", "tp", "pp", "vpp", "micro_batch"):
        if key in values:
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"layout.{key} must be a positive integer, got {v!r}.")
    if "devices" not in values:
        raise InputError("layout.devices is required.")
    values.setdefault("fsdp", values["devices"])
    values["recompute"] = parse_recompute(values.get("recompute", "none"))
    values["offload"] = parse_offload(values.get("offload", ()))
    precision = values.get("precision", "bf16")
    if precision not in PRECISIONS:
        raise InputError(f"layout.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    kernels = dict(DEFAULT_KERNELS)
    given = values.get("kernels") or {}
    if not isinstance(given, dict):
        raise InputError("layout.kernels must be a mapping such as {attention: sdpa}.")
    for kind, choice in given.items():
        if kind not in KERNEL_CHOICES or choice not in KERNEL_CHOICES[kind]:
            raise InputError(f"layout.kernels.{kind}={choice!r} is not valid; choices: "
                             + "; ".join(f"{k}: {', '.join(v)}" for k, v in KERNEL_CHOICES.items()) + ".")
        kernels[kind] = choice
    values["kernels"] = kernels
    return Layout(**values)


def check_layout(layout: Layout, config, seq_len: int, global_batch: int | None = None) -> None:
    """Divisibility and architectural constraints; raises InputError naming the first violation.

    `config` is a runtime ModelConfig (only its fields are read).
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise InputError(message)

    d = layout
    need(d.devices % (d.tp * d.pp) == 0,
         f"devices ({d.devices}) must be a multiple of tp × pp ({d.tp} × {d.pp}).")
    need(d.dp_world % d.sp == 0, f"sp ({d.sp}) must divide the data-parallel world ({d.dp_world} = devices / (tp × pp)).")
    need(d.dp_world % d.fsdp == 0,
         f"fsdp ({d.fsdp}) must divide the data-parallel world ({d.dp_world}); use a divisor for HSDP.")
    if d.fsdp > 1:
        need(d.fsdp % d.ep == 0, f"ep ({d.ep}) must divide the FSDP shard group ({d.fsdp}): experts are split "
                                 "over EP ranks inside each shard group.")
    else:
        # Megatron-style: the expert-parallel group may span tensor-parallel ranks (expert TP = 1).
        need((d.dp_world * d.tp) % d.ep == 0,
             f"ep ({d.ep}) must divide the data-parallel × tensor-parallel ranks ({d.dp_world} × {d.tp}).")
    if d.ep > 1:
        need(config.num_experts > 0, f"ep = {d.ep} needs a mixture-of-experts model; {config.name} is dense.")
        need(config.num_experts % d.ep == 0,
             f"ep ({d.ep}) must divide the number of routed experts ({config.num_experts}).")
    if d.sp > 1:
        heads, kv = config.num_heads, config.num_kv_heads
        if config.attention_kind == "mla":
            kv = heads  # MLA expands its latent into one k/v per head before attention
        need(heads % d.sp == 0, f"Ulysses sp ({d.sp}) must divide the attention heads ({heads}).")
        need(kv % d.sp == 0 or d.sp % kv == 0,
             f"Ulysses sp ({d.sp}) and the kv heads ({kv}) must divide one another (kv heads are repeated "
             "when sp exceeds them).")
        need(seq_len % d.sp == 0, f"seq_len ({seq_len}) must be a multiple of sp ({d.sp}).")
    if d.tp > 1:
        need(config.num_heads % d.tp == 0, f"tp ({d.tp}) must divide the attention heads ({config.num_heads}).")
    if d.pp > 1 or d.vpp > 1:
        # Embedding and loss may take a virtual stage each (as Megatron's uneven split allows).
        need(config.num_layers + 2 >= d.pp * d.vpp,
             f"pp × vpp ({d.pp} × {d.vpp}) stages cannot exceed the layers ({config.num_layers}) + 2.")
    need(d.vpp == 1 or d.pp > 1, "vpp > 1 needs pipeline parallelism (pp > 1).")
    if global_batch is not None:
        layout.grad_accum(global_batch)
