"""The parallel layout: every knob declared once (type, default, bounds, help, what the runtime runs).

CLI options, `whatif --set` keys, the plan's `layout` section and the runtime's refusals derive
from the fields of `Layout` and `Kernels` below (`knobs()`); nothing restates them.

Devices and ranks: `devices` counts the hardware profile's devices (a GPU; on a3 a 910C package), a
rank is one process on one torch device. A profile with `ranks_per_device` r (2 on a3, one rank per
die) runs devices × r ranks; every other size (tp, pp, sp, fsdp, ep, micro_batch) counts ranks. r
is the hardware's, not a layout choice: the plan file states it next to `devices`.

Rank arithmetic, used the same way by the cost models, the search and the runtime:

    ranks    = devices * ranks_per_device
    ranks    = tp * pp * dp_world           (dp_world: ranks that hold one model slice)
    dp_world = sp * data_parallel           (sp ranks split one sequence, Ulysses)
    dp_world = fsdp * hsdp_replicas         (dense weights sharded over `fsdp` ranks)
    fsdp     = ep * expert_fsdp             (routed experts split over `ep`, then sharded)
    zero1: ep | dp_world * tp; expert_tp = tp when ep | dp_world, else 1 (EP spans the TP ranks)

Data-parallel modes (`dp_mode`), one meaning for planner and runtime:
    fsdp   parameters, gradients and optimizer states sharded over all dp_world ranks (FSDP2)
    hsdp   sharded over `fsdp` ranks, replicated across dp_world / fsdp groups (FSDP2, 2-D mesh)
    ddp    replicated, gradients all-reduced (FSDP2 with a shard group of 1)
    zero1  parameters and gradients replicated, optimizer states sharded over dp_world (experts'
           over the ranks holding them): Megatron's distributed optimizer, `runtime/distributed/zero1.py`

Gradient accumulation: global_batch = data_parallel * micro_batch * grad_accum   (sequences)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from xplan.errors import InputError
from xplan.layout_tiles import TILE_TOKENS_HELP, TileTokens
from xplan.layout_values import (  # noqa: F401 (re-exported: the knobs' value parsers)
    GATHERED_KINDS,
    OFFLOAD_KINDS,
    RECOMPUTE_MODES,
    parse_keep_gathered,
    parse_offload,
    parse_recompute,
    recompute_policies,
)

ALLOCATORS = ("expandable_segments", "caching")
PRECISIONS = ("fp32", "bf16", "fp8")
DP_MODES = ("fsdp", "hsdp", "ddp", "zero1")
DEVICE_TYPES = ("cpu", "cuda", "npu")
_ALL = DEVICE_TYPES
_NONE: tuple[str, ...] = ()
_ACCELERATORS = ("cuda", "npu")
_CUDA = ("cuda",)


def knob(default: Any = ..., help: str = "", *, flag: str | None = None, short: str | None = None,
         runs: dict[str, tuple[str, ...]] | None = None, runtime_max: int | None = None,
         price_only: bool = False, **bounds: Any) -> Any:
    """A pydantic Field carrying the knob's CLI flag, help and what the runtime executes:
    `runs` maps each choice to the device types the runtime runs it on (empty: priced only);
    `runtime_max` is the largest integer value the runtime runs; `price_only` marks an
    assumption about another engine that only the cost model reads."""
    extra = {"flag": flag, "short": short, "runs": runs, "runtime_max": runtime_max, "price_only": price_only}
    return Field(default, description=help, json_schema_extra={k: v for k, v in extra.items() if v is not None},
                 **bounds)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Kernels(_Frozen):
    """Which implementation runs in each kernel slot."""

    attention: Literal["sdpa", "eager", "flash", "flex", "flash1"] = knob(
        "sdpa", "Attention kernel: sdpa (torch scaled_dot_product_attention's default dispatch; the blockwise "
        "path for sinks, windows and MLA off CUDA), eager (unfused matmul, softmax, matmul), flash (fused: an "
        "explicit SDPA flash/cuDNN/memory-efficient backend, flex_attention for sinks, windows and MLA on CUDA; "
        "npu_fusion_attention on Ascend), flex (compiled flex_attention for every layer, CUDA: torch has no "
        "flex backward on CPU), flash1 (FlashAttention-1, older stacks; priced, not run).",
        runs={"sdpa": _ALL, "eager": _ALL, "flash": _ACCELERATORS, "flex": _CUDA, "flash1": _NONE})
    moe_gemm: Literal["grouped_mm", "loop"] = knob(
        "grouped_mm", "Routed-expert GEMMs: grouped_mm (torch._grouped_mm where aligned; Triton token "
        "permutation on CUDA) or loop (one per expert).",
        flag="--moe-gemm", runs={"grouped_mm": _ALL, "loop": _ALL})
    loss: Literal["full", "chunked", "fused"] = knob(
        "chunked", "Loss kernel: full logits, chunked (LM head and cross-entropy by token chunks), or fused (one "
        "cross-entropy kernel over the compute-dtype logits that writes their gradient in place, as Transformer "
        "Engine's and Megatron's fused cross entropy; priced, not run).",
        runs={"full": _ALL, "chunked": _ALL, "fused": _NONE})
    elementwise: Literal["fused", "eager"] = knob(
        "fused", "Elementwise ops: fused (each block compiled on accelerators; Triton RMSNorm on CUDA) or eager "
        "(one kernel per op).",
        runs={"fused": _ACCELERATORS, "eager": _ALL})
    norm: Literal["auto", "fused"] = knob(
        "auto", "Normalisation kernel: auto (as the elementwise ops run) or fused (one kernel that keeps only "
        "its input for backward, e.g. a Triton RMSNorm beside eager elementwise ops; priced, not run).",
        runs={"auto": _ALL, "fused": _NONE})

    # Dict-style reads (`layout.kernels.get("loss")`) for code that takes a slot name.
    def get(self, slot: str, default: Any = None) -> Any:
        return getattr(self, slot, default)

    def __getitem__(self, slot: str) -> Any:
        return getattr(self, slot)


class Layout(_Frozen):
    """Every layout decision. Build with `layout_from_dict` (messages that name the knob)."""

    devices: int = knob(..., "Total number of devices (the hardware profile's unit: on a3 a 910C package, "
                        "which runs 2 ranks).", short="-n", ge=1)
    # The hardware profile's (the plan file's top-level `ranks_per_device`), so not a knob.
    ranks_per_device: int = Field(1, ge=1, description="Ranks per device.", json_schema_extra={"hardware": True})
    dp_mode: Literal["fsdp", "hsdp", "ddp", "zero1"] | None = knob(
        None, "Data-parallel mode: fsdp (shard over all data-parallel ranks), hsdp (shard over --fsdp ranks, "
        "replicate across groups), ddp (replicate, all-reduce gradients), zero1 (shard optimizer states only, "
        "Megatron's distributed optimizer: replicated parameters, one gradient reduce-scatter and parameter "
        "all-gather per step). Default: zero1 with tp or pp > 1, else from "
        "--fsdp (all ranks: fsdp; 1: ddp; between: hsdp).",
        flag="--dp-mode", runs={"fsdp": _ALL, "hsdp": _ALL, "ddp": _ALL, "zero1": _ALL})
    fsdp: int | None = knob(None, "FSDP shard-group size in ranks (hsdp: < data-parallel ranks); "
                            "default all data-parallel ranks, 1 for ddp and zero1.", ge=1)
    ep: int = knob(1, "Expert-parallel size.", ge=1)
    sp: int = knob(1, "Ulysses sequence-parallel degree.", ge=1)
    tp: int = knob(1, "Tensor-parallel degree (priced for comparison, not run).", ge=1, runtime_max=1)
    pp: int = knob(1, "Pipeline-parallel stages (priced for comparison, not run).", ge=1, runtime_max=1)
    vpp: int = knob(1, "Virtual pipeline stages per rank (interleaved 1F1B; priced, not run).", ge=1,
                    runtime_max=1)
    micro_batch: int = knob(1, "Sequences per micro-batch per data-parallel rank.", ge=1)
    recompute: str | float = knob("none", "none | selective | full | fraction of layers fully recomputed "
                                  "(e.g. 0.5).")
    vision_recompute: Literal["none", "selective", "full"] = knob(
        "none", "Recompute of the vision tower's encoder layers (vision-language models with image tokens): "
        "none, selective (as --recompute selective, per vision layer) or full (each vision layer "
        "checkpointed: only its input is kept).", runs={"none": _ALL, "selective": _ALL, "full": _ALL})
    offload: tuple[str, ...] = knob(
        (), "none | optimizer,params,activations (comma-separated): optimizer = AdamW moments in host memory "
        "between steps; params = FSDP2 CPU offload (parameters, gradients, moments; the step runs on host); "
        "activations = what each block saves for backward (the layer input under full recompute), copied to "
        "host on a side stream and prefetched one layer ahead.")
    tile_tokens: TileTokens = knob(None, TILE_TOKENS_HELP)  # rules: xplan/layout_tiles.py
    keep_gathered: tuple[str, ...] = knob(
        (), "none | dense,moe,vision: blocks (by MLP type; vision: a vision-language model's tower) whose "
        "parameters stay gathered across the step's micro-batches (ZeRO-2-like: one all-gather per step instead "
        "of two per micro-batch); none: every block reshards after forward (ZeRO-3).", flag="--keep-gathered")
    allocator: Literal["expandable_segments", "caching"] = knob(
        "expandable_segments", "Device allocator: expandable_segments (the caching allocator with expandable "
        "segments, which avoids most fragmentation; set before the first allocation on CUDA) or caching (its "
        "default mode). No effect on CPU.", runs={"expandable_segments": _ALL, "caching": _ALL})
    precision: Literal["fp32", "bf16", "fp8"] = knob(
        "bf16", "fp32 | bf16 | fp8 (bf16 plus torchao Float8Linear GEMMs in the blocks' linear layers, "
        "training.fp8_recipe scaling; LM head, embedding, routers and routed experts stay bf16; on cpu "
        "torch._scaled_mm's reference kernel gives fp8 numerics, not fp8 speed; not run on npu).",
        runs={"fp32": _ALL, "bf16": _ALL, "fp8": ("cpu", "cuda")})
    tp_comm: Literal["exposed", "overlapped"] = knob(
        "exposed", "Tensor-parallel collectives exposed, or overlapped with the GEMMs as Megatron's "
        "--tp-comm-overlap runs them (an assumption about that engine; only the cost model reads it).",
        flag="--tp-comm", price_only=True)
    ep_overlap: Literal["exposed", "microbatch", "dualpipe"] = knob(
        "exposed", "Expert-parallel all-to-all schedule: exposed (on the critical path, what the runtime runs), "
        "microbatch (overlapped with another micro-batch's compute, Megatron-core's EP A2A overlap), dualpipe "
        "(DeepSeek's DualPipe pipeline schedule: forward and backward chunks of two micro-batches overlapped, "
        "hiding the all-to-alls and pipeline sends; two parameter copies per rank). Priced, not run.",
        flag="--ep-overlap", runs={"exposed": _ALL, "microbatch": _NONE, "dualpipe": _NONE})
    grad_dtype: Literal["fp32", "bf16"] = knob(
        "fp32", "Gradient accumulation and data-parallel reduction dtype: fp32 (the runtime) or bf16 (Megatron "
        "with grad_reduce_in_fp32 off: zero1 keeps bf16 gradients; an assumption about that engine, only the "
        "cost model reads it).", flag="--grad-dtype", runs={"fp32": _ALL, "bf16": _NONE})
    fsdp_buffers: Literal["copy", "zero_copy"] = knob(
        "copy", "FSDP collective buffers: copy (FSDP2 copies each shard into and out of the collectives' buffers, "
        "what the runtime runs) or zero_copy (Megatron-FSDP: parameters and gradients live in the buffers the "
        "collectives use, its ParamAndGradBuffer). Priced, not run.",
        flag="--fsdp-buffers", runs={"copy": _ALL, "zero_copy": _NONE})
    kernels: Kernels = Field(default_factory=Kernels, description="Kernel choice per slot.")

    @field_validator("devices", "ranks_per_device", "fsdp", "ep", "sp", "tp", "pp", "vpp", "micro_batch",
                     mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        # No coercion: "8" or True in a plan file is a mistake to report, not to guess.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("must be a positive integer")
        return value

    @field_validator("recompute", mode="before")
    @classmethod
    def _recompute(cls, value: Any) -> str | float:
        return parse_recompute(value)

    @field_validator("offload", mode="before")
    @classmethod
    def _offload(cls, value: Any) -> tuple[str, ...]:
        return parse_offload(value)

    @field_validator("keep_gathered", mode="before")
    @classmethod
    def _keep_gathered(cls, value: Any) -> tuple[str, ...]:
        return parse_keep_gathered(value)

    @field_validator("kernels", mode="before")
    @classmethod
    def _kernels(cls, value: Any) -> Any:
        return Kernels(**value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _resolve_dp_mode(self) -> Layout:
        tp_pp = self.tp * self.pp
        if self.ranks % tp_pp:
            raise ValueError(f"{self.ranks_text(noun_first=True)} must be a multiple of tp × pp ({self.tp} × {self.pp})")
        dp_world = self.ranks // tp_pp
        mode, fsdp = self.dp_mode, self.fsdp
        derived = mode is None
        if derived:
            if fsdp is None:
                mode = "zero1" if tp_pp > 1 else "fsdp"
            elif fsdp == dp_world:
                mode = "fsdp"
            elif fsdp == 1:
                mode = "zero1" if tp_pp > 1 else "ddp"
            else:
                mode = "hsdp"
        if fsdp is None:
            if mode == "hsdp":
                raise ValueError("dp_mode hsdp needs the shard-group size: set fsdp")
            fsdp = dp_world if mode == "fsdp" else 1
        expected = {"fsdp": fsdp == dp_world, "hsdp": 1 < fsdp < dp_world, "ddp": fsdp == 1, "zero1": fsdp == 1}
        # A derived mode is consistent by construction; a size that does not divide dp_world is
        # check_layout's to report, with the rest of the divisibility rules.
        if not derived and not expected[mode]:
            need = {"fsdp": f"fsdp = {dp_world} (all data-parallel ranks)", "hsdp": f"1 < fsdp < {dp_world}",
                    "ddp": "fsdp = 1", "zero1": "fsdp = 1"}[mode]
            raise ValueError(f"dp_mode {mode} needs {need}, got fsdp = {fsdp}")
        object.__setattr__(self, "dp_mode", mode)
        object.__setattr__(self, "fsdp", fsdp)
        return self

    # ------------------------------------------------------------------ derived
    @property
    def ranks(self) -> int:
        """Processes the layout runs on: devices × ranks_per_device."""
        return self.devices * self.ranks_per_device

    def ranks_text(self, noun_first: bool = False) -> str:
        """For messages: "8 ranks" / "16 ranks (8 devices × 2)"; noun first: "devices (8)" /
        "ranks (16 = 8 devices × 2)"."""
        split = f"{self.devices} devices × {self.ranks_per_device}"
        if noun_first:
            return f"devices ({self.devices})" if self.ranks_per_device == 1 else f"ranks ({self.ranks} = {split})"
        return f"{self.ranks} rank{'s' * (self.ranks != 1)}" + (f" ({split})" if self.ranks_per_device > 1 else "")

    @property
    def dp_world(self) -> int:
        return self.ranks // (self.tp * self.pp)

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
    def expert_tp(self) -> int:
        """Ranks one routed expert is split over: tp while the EP group fits in the data-parallel
        world (experts tensor-parallel like the dense layers), 1 when EP spans the tensor-parallel
        ranks (Megatron's expert TP 1: the EP group then runs over consecutive ranks)."""
        return self.tp if self.ep <= self.dp_world else 1

    @property
    def zero1(self) -> bool:
        """Parameters and gradients replicated, optimizer states sharded over the data-parallel
        ranks (Megatron's distributed optimizer); gathered once per step."""
        return self.dp_mode == "zero1"

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
                f"micro_batch ({self.micro_batch}) = {per_step}; change the global batch or the micro-batch."
            )
        return global_batch // per_step

    def settings(self) -> dict[str, Any]:
        """The declared knobs as plain data (what a plan file's `layout` holds, plus devices)."""
        out = self.model_dump(mode="json")
        out["offload"], out["keep_gathered"] = list(self.offload), list(self.keep_gathered)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every knob plus the derived sizes (JSON output)."""
        return {**self.settings(), **{name: getattr(self, name) for name in DERIVED_FIELDS}}

    def with_changes(self, **changes: Any) -> Layout:
        return layout_from_dict({**self.settings(), **changes})


DERIVED_FIELDS = ("ranks", "dp_world", "data_parallel", "hsdp_replicas", "expert_fsdp")
DEFAULT_KERNELS = Kernels().model_dump()
KERNEL_CHOICES = {name: tuple(info.json_schema_extra["runs"]) for name, info in Kernels.model_fields.items()}


# ---------------------------------------------------------------------------- the knob table
@dataclass(frozen=True)
class KnobInfo:
    """One declared knob, as the CLI, whatif and the runtime checks see it."""

    name: str  # key in a flat {knob: value} mapping (kernel slots by their own name)
    path: tuple[str, ...]  # where it lives in Layout: ("fsdp",) or ("kernels", "loss")
    flag: str
    short: str | None
    help: str
    kind: type  # int or str: how a command-line string is read
    default: Any
    required: bool
    runs: dict[str, tuple[str, ...]] | None
    runtime_max: int | None
    price_only: bool


def _kind(info: Any) -> type:
    text = str(info.annotation)
    # A knob whose field parses strings itself (tile_tokens: "none" or a count) is read as text.
    parses = any(type(m).__name__ == "BeforeValidator" for m in info.metadata)
    return int if "int" in text and "float" not in text and not parses else str


def knobs(model: type[BaseModel] | None = None) -> Iterator[KnobInfo]:
    """Every knob of `model` (default `Layout`), nested models (kernels) flattened."""
    model = model or Layout
    for name, info in model.model_fields.items():
        if (info.json_schema_extra or {}).get("hardware"):
            continue  # set from the hardware profile, not chosen
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub in knobs(annotation):
                yield dataclasses.replace(sub, path=(name, *sub.path))
            continue
        extra = info.json_schema_extra or {}
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        yield KnobInfo(name, (name,), extra.get("flag") or "--" + name.replace("_", "-"), extra.get("short"),
                       info.description or "", _kind(info), default, info.is_required(), extra.get("runs"),
                       extra.get("runtime_max"), bool(extra.get("price_only")))


def flat_to_nested(flat: dict[str, Any], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """{knob name: value} (as from CLI flags or `--set`) -> the nested Layout mapping; None values
    are left out (unset)."""
    out: dict[str, Any] = {}
    for info in knobs(model):
        value = flat.get(info.name)
        if value is None:
            continue
        target = out
        for part in info.path[:-1]:
            target = target.setdefault(part, {})
        target[info.path[-1]] = value
    return out


def knob_value(layout: Layout, info: KnobInfo) -> Any:
    value: Any = layout
    for part in info.path:
        value = getattr(value, part)
    return value


def runtime_refusals(layout: Layout, device_type: str | None) -> list[str]:
    """Why the runtime would not execute `layout` on `device_type` (empty: it runs as priced).
    With no device type, only values the runtime executes nowhere are reported."""
    out = []
    for info in knobs(type(layout)):
        value = knob_value(layout, info)
        if info.runs is not None:
            where = info.runs.get(value, ())
            if not where:
                out.append(f"{'.'.join(info.path)} = {value} is priced only (the runtime does not execute it)")
            elif device_type is not None and device_type not in where:
                out.append(f"{'.'.join(info.path)} = {value} runs on {', '.join(where)} only, not {device_type}")
        if info.runtime_max is not None and value > info.runtime_max:
            out.append(f"{info.name} = {value} is priced only (the runtime executes {info.name} = "
                       f"{info.runtime_max})")
    return out


# A hardware profile's device kind -> the torch device type the runtime runs it as.
DEVICE_TYPE_OF_KIND = {"gpu": "cuda", "npu": "npu", "cpu": "cpu"}


def parse_knob(name: str, value: Any) -> Any:
    """One knob's value checked on its own (a pinned search flag, a `whatif --set`); strings from
    the command line are read as the knob's type. Raises InputError naming the flag."""
    info = next((k for k in knobs() if k.name == name), None)
    if info is None:
        raise InputError(f"unknown layout knob {name!r}; known: {', '.join(k.name for k in knobs())}.")
    if info.kind is int and isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise InputError(f"{info.flag} needs an integer, got {value!r}.") from None
    if name == "recompute":
        return parse_recompute(value)
    if name in ("offload", "keep_gathered"):
        return (parse_offload if name == "offload" else parse_keep_gathered)(value)
    model: type[BaseModel] = Layout
    for part in info.path[:-1]:
        model = model.model_fields[part].annotation
    field = model.model_fields[info.path[-1]]
    try:
        parsed = TypeAdapter(Annotated[field.annotation, field]).validate_python(value)
        if info.kind is int and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("must be a positive integer")
    except (ValidationError, ValueError) as exc:
        reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        reason = reason.removeprefix("Value error, ").rstrip(".")
        raise InputError(f"{info.flag}: {reason}" + ("." if "got" in reason else f", got {value!r}.")) from None
    return parsed  # as the layout holds it (tile_tokens "none" -> None, "8192" -> 8192)


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        known = ", ".join(info.name for info in knobs())
        return f"unknown layout key {where!r}; known: {known}"
    if error["type"] == "missing":
        return f"layout.{where} is required"
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, InputError):  # our own parsers' messages already say what was given
        return f"layout.{where}: {cause}".rstrip(".")
    given = f", got {error['input']!r}" if "input" in error and not isinstance(error["input"], dict) else ""
    return f"layout.{where}: {message}{given}" if where else message


def layout_from_dict(data: dict[str, Any]) -> Layout:
    """Build and type-check a Layout from a plain mapping (derived fields are ignored)."""
    if not isinstance(data, dict):
        raise InputError(f"a layout must be a mapping of knobs, got {type(data).__name__}.")
    values = {k: v for k, v in data.items() if k not in DERIVED_FIELDS}
    try:
        return Layout(**values)
    except ValidationError as exc:
        raise InputError("; ".join(_describe(e) for e in exc.errors()[:3]) + ".") from None


# The divisibility and architecture checks live beside (xplan/layout_check.py); imported here so
# `xplan.layout.check_layout` stays the one name every caller uses.
from xplan.layout_check import check_layout  # noqa: E402, F401
