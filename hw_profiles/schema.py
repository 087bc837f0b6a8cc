"""The hardware-profile schema (pydantic v2) and the data accessors the cost models read.

A profile describes one kind of *device* (what one device is, e.g. one GPU or one Ascend 910C
package, is stated in ``device.definition``) and the hierarchy of interconnect levels that joins
devices into a cluster. Units are fixed by the field names and documented in
``hw_profiles/README.md``:

- ``*_tflops``: 10^12 FLOP/s, dense (no sparsity)
- ``*_gib``: 2^30 bytes
- ``*_tbps``: 10^12 bytes/s; ``*_gbps``: 10^9 **bytes**/s (GB/s, not Gb/s), per direction
- ``*_us``: microseconds; ``*fraction``: a number in (0, 1]

The accessor methods return SI units (FLOP/s, bytes, bytes/s, seconds) so cost models never
convert units themselves. The time formulas that use these numbers live in
``xplan.cost_models.kernels``; this package imports nothing from the cost models.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from xplan.errors import InputError

SCHEMA_VERSION = 1

#: Compute dtypes a profile prices. ``fp32`` is for small exact-parity runs.
DTYPES: tuple[str, ...] = ("bf16", "fp8", "fp32")
#: Collective kinds with their own achievable fraction on every interconnect level.
COLLECTIVES: tuple[str, ...] = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "p2p")

_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp8": "fp8", "float8": "fp8", "float8_e4m3fn": "fp8", "e4m3": "fp8", "torch.float8_e4m3fn": "fp8",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
}

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Text = Annotated[str, Field(min_length=1)]


class _Model(BaseModel):
    # strict: no silent "989" -> 989.0 or true -> 1; ints are still accepted for floats.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class PeakTflops(_Model):
    """Dense peak per dtype; ``null`` means the device has no such tensor-core path."""

    bf16: Positive
    fp8: Positive | None
    fp32: Positive | None


class DtypeFractions(_Model):
    """An achievable fraction of the peak, per dtype (``null`` where the peak is ``null``)."""

    bf16: Fraction
    fp8: Fraction | None
    fp32: Fraction | None


class UnalignedFractions(_Model):
    """Fractions of the bf16 peak that misaligned GEMM widths reach (see ``GemmModel.unaligned``)."""

    odd: Fraction
    even: Fraction


class GemmModel(_Model):
    """GEMM time = max(FLOPs / (peak x max_fraction), bytes / achievable HBM bw) + overhead
    (``xplan.cost_models.kernels.gemm_time``).

    ``max_fraction`` is what the largest, best-shaped GEMMs reach (a MAMF-style number);
    small GEMMs fall below it because their bytes (HBM roofline) and the fixed per-call
    ``overhead_us`` (launch, pipeline fill and drain) dominate. A grouped GEMM (MoE experts)
    pays the overhead once per call.
    """

    max_fraction: DtypeFractions
    overhead_us: NonNegative
    #: Share of the output write (epilogue) that does not overlap the main loop: each output
    #: tile is stored after its K loop ends, so time = max(FLOPs / rate, input bytes / bw)
    #: + epilogue_fraction x output bytes / bw + overhead. ``null``: fully overlapped (the
    #: output counts with the inputs in the HBM roofline), as a calibrated profile assumes.
    epilogue_fraction: NonNegative | None = None
    #: bf16 GEMMs whose n or k is not a multiple of 8 elements (16 bytes) leave cuBLAS's
    #: tensor-core fast path: their compute rate is at most this fraction of the bf16 peak, by
    #: the width's largest power-of-two factor (``odd``; ``even``: 2 or 4). ``null``: not priced.
    #: fp8 stacks pad their operands to 16 and are not affected.
    unaligned: UnalignedFractions | None = None


class AttentionPass(_Model):
    """One attention pass: ``max_fraction * s / (s + half_seq)`` of the peak on model FLOPs
    (causal half; backward = 2 x forward, the scores a fused backward recomputes left out), plus
    ``tail_us`` per kernel call beyond the launch overhead: the last, longest causal tiles run on
    a part of the GPU while the rest idles, a fixed cost that a small call (micro-batch 1, few
    heads per rank) does not amortise. ``null``: not measured (none priced)."""

    max_fraction: Fraction
    half_seq: NonNegative
    tail_us: NonNegative | None = None


class AttentionModel(_Model):
    """The fused flash-attention kernel's efficiency by pass (the ``flash`` kernel choice).

    ``sdpa_fraction``: what torch's ``scaled_dot_product_attention`` kernel reaches relative to
    that fit on this device (``null``: the same kernel, e.g. FlashAttention-2 on Ampere).
    ``flash1_fraction``: the same for FlashAttention-1 (the ``flash1`` choice; ``null``: not
    priced on this device).
    """

    forward: AttentionPass
    backward: AttentionPass
    sdpa_fraction: Fraction | None = None
    flash1_fraction: Fraction | None = None


class Compute(_Model):
    peak_tflops: PeakTflops
    gemm: GemmModel
    attention: AttentionModel

    @model_validator(mode="after")
    def _dtypes_agree(self) -> Compute:
        for d in DTYPES:
            has_peak = getattr(self.peak_tflops, d) is not None
            has_frac = getattr(self.gemm.max_fraction, d) is not None
            if has_peak != has_frac:
                raise ValueError(
                    f"peak_tflops.{d} is {'set' if has_peak else 'null'} but gemm.max_fraction.{d} is "
                    f"{'set' if has_frac else 'null'}: give both (the dtype is supported) or neither"
                )
        return self


class Memory(_Model):
    """Device memory (HBM; DRAM on the cpu profile)."""

    hbm_gib: Positive
    hbm_tbps: Positive
    hbm_fraction: Fraction
    # Optional: what the framework's caching allocator reserves beyond the allocated peak, as a
    # fraction of that peak (fragmentation); absent / null = 0. Capacity checks use the sum.
    fragmentation: Annotated[float, Field(ge=0, lt=1)] | None = None
    # The same with the allocator's expandable segments on (layout allocator=expandable_segments,
    # what the runtime sets by default); absent / null = `fragmentation`.
    fragmentation_expandable: Annotated[float, Field(ge=0, lt=1)] | None = None


class Host(_Model):
    """Host memory and the host<->device link, per device (for offload).

    ``dispatch_us``: host time to issue one op of the training loop (Python, autograd, the
    dispatcher, hooks). Kernels run asynchronously, so a micro-batch takes at least its ops x
    this; it binds only for small models (``null``: not priced)."""

    memory_gib: Positive
    link_gbps: Positive
    link_fraction: Fraction
    dispatch_us: NonNegative | None = None


class CollectiveFractions(_Model):
    all_gather: Fraction
    reduce_scatter: Fraction
    all_reduce: Fraction
    all_to_all: Fraction
    p2p: Fraction


class Level(_Model):
    """One level of the interconnect hierarchy.

    ``devices``: how many devices one unit of this level holds (8 for an 8-GPU NVLink island);
    ``null`` on the outermost level means "the whole cluster, unbounded".
    ``bandwidth_gbps``: nominal per-device, per-direction bandwidth into this level (GB/s).
    ``topology``: ``switch`` (every subgroup gets the full per-device bandwidth) or
    ``full_mesh`` (point-to-point links, so a group of n of the level's D devices gets
    (n-1)/(D-1) of it).
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    devices: Annotated[int, Field(ge=2)] | None
    topology: Literal["switch", "full_mesh"]
    bandwidth_gbps: Positive
    latency_us: NonNegative
    fraction: CollectiveFractions


class Interconnect(_Model):
    levels: Annotated[list[Level], Field(min_length=1)]

    @model_validator(mode="after")
    def _levels_nest(self) -> Interconnect:
        names = [lv.name for lv in self.levels]
        for i, nm in enumerate(names):
            if nm in names[:i]:
                raise ValueError(f"levels[{i}].name {nm!r} repeats an earlier level's name; names must be unique")
        for i, lv in enumerate(self.levels[:-1]):
            if lv.devices is None:
                raise ValueError(
                    f"levels[{i}].devices is null (unbounded) but is not the last level: only the "
                    "outermost level may be unbounded"
                )
        for i in range(1, len(self.levels)):
            inner, outer = self.levels[i - 1].devices, self.levels[i].devices
            if outer is not None and inner is not None and (outer <= inner or outer % inner):
                raise ValueError(
                    f"levels[{i}].devices ({outer}) must be a larger multiple of levels[{i - 1}].devices "
                    f"({inner}): each level is made of whole units of the level inside it"
                )
        return self


class Device(_Model):
    kind: Literal["gpu", "npu", "cpu"]
    model: Text
    #: What one planner "device" is, in words (e.g. one GPU; one 910C package = 2 dies).
    definition: Text
    #: Runtime ranks (torch devices) per planner device: 2 on A3, where torch_npu exposes each
    #: die of a 910C package as its own device.
    ranks_per_device: Annotated[int, Field(ge=1)]


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Yield (path, value) for every node below ``value`` (paths like ``a.b[0].c``)."""
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            sub = f"{path}.{name}" if path else name
            child = getattr(value, name)
            yield sub, child
            yield from _walk(child, sub)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            sub = f"{path}[{i}]"
            yield sub, child
            yield from _walk(child, sub)


def _covered(path: str, keys: set[str]) -> bool:
    """A source for ``a.b`` covers ``a.b``, ``a.b.c`` and ``a.b[0]``."""
    if path in keys:
        return True
    for i, ch in enumerate(path):
        if ch in ".[" and path[:i] in keys:
            return True
    return False


class FittedOn(_Model):
    """Which measured rows a constant was fitted on (issue #18: fitting is kept apart from scoring).

    ``rows``: published validation row ids (``xplan validate`` reports them as calibration rows
    and refits the constant without them when their source is left out), or measurement files
    (``benchmarks/results/...``) for constants fitted to this project's own runs. ``prior``: the
    value to use when every fitting row is left out (a literature or microbenchmark value;
    ``null``: the field's "not priced" value). A constant with no entry was measured or taken from
    the literature without looking at any row."""

    rows: Annotated[list[Text], Field(min_length=1)]
    prior: float | None = None


_PER_RANK: dict[int, tuple[Profile, Profile]] = {}  # id(profile) -> (profile, its per-rank view)


class Profile(_Model):
    """A hardware profile: one device kind and the interconnect hierarchy joining devices."""

    schema_version: Literal[1]
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: Text
    device: Device
    compute: Compute
    memory: Memory
    host: Host
    interconnect: Interconnect
    #: Where every number came from: dotted field path (``compute.peak_tflops.bf16``,
    #: ``interconnect.levels[0]``) -> source text. A key covers the fields below it.
    sources: dict[Text, Text]
    #: Constants fitted on measured rows: dotted field path (a number) -> rows and prior.
    fitted_on: dict[Text, FittedOn] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fitted_on_names_numbers(self) -> Profile:
        numbers = {p: v for p, v in _walk(self, "") if not p.startswith(("sources", "fitted_on"))}
        for path in self.fitted_on:
            value = numbers.get(path, "")
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise ValueError(f"fitted_on names {path!r}, which is not a number of this profile (use the "
                                 "dotted path of one constant, e.g. 'memory.fragmentation'; optional ones may be null)")
            if not _covered(path, set(self.sources)):
                raise ValueError(f"fitted_on names {path!r}, which has no sources entry")
        return self

    @model_validator(mode="after")
    def _every_number_has_a_source(self) -> Profile:
        nodes = [(p, v) for p, v in _walk(self, "") if not p.startswith(("sources", "fitted_on"))]
        known = {p for p, _ in nodes}
        keys = set(self.sources)
        unknown = sorted(k for k in keys if k not in known)
        if unknown:
            raise ValueError(
                f"sources names fields that do not exist: {', '.join(unknown[:5])}"
                f"{' …' if len(unknown) > 5 else ''} (use dotted paths such as "
                "'compute.peak_tflops.bf16' or 'interconnect.levels[0].bandwidth_gbps')"
            )
        missing = [
            p for p, v in nodes
            if isinstance(v, int | float) and not isinstance(v, bool)
            and p != "schema_version" and not _covered(p, keys)
        ]
        if missing:
            raise ValueError(
                f"sources has no entry for {', '.join(missing[:5])}"
                f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}: every number needs "
                "its source (a paper, datasheet, measurement command and date, or 'assumed: why')"
            )
        return self

    def per_rank(self) -> Profile:
        """The profile of one rank: with ranks_per_device r > 1 (a3: one rank per die of a 910C
        package) peak FLOPs, HBM capacity and bandwidth, host memory and link and every level's
        bandwidth are split r ways and a level's device count counts ranks (the profile's own
        header: "halve ... for per-die numbers"). r = 1: the profile itself. One object per
        profile, so memos keyed on the profile's id keep hitting."""
        r = self.device.ranks_per_device
        if r == 1:
            return self
        known = _PER_RANK.get(id(self))
        if known is not None and known[0] is self:
            return known[1]
        peak = self.compute.peak_tflops
        split = {k: (v / r if v is not None else None) for k, v in peak.model_dump().items()}
        derived = self.model_copy(update={
            "name": f"{self.name}-rank",
            "device": self.device.model_copy(update={"ranks_per_device": 1,
                                                     "definition": f"one rank of {self.device.definition}"}),
            "compute": self.compute.model_copy(update={"peak_tflops": peak.model_copy(update=split)}),
            "memory": self.memory.model_copy(update={"hbm_gib": self.memory.hbm_gib / r,
                                                     "hbm_tbps": self.memory.hbm_tbps / r}),
            "host": self.host.model_copy(update={"memory_gib": self.host.memory_gib / r,
                                                 "link_gbps": self.host.link_gbps / r}),
            "interconnect": self.interconnect.model_copy(update={"levels": [
                level.model_copy(update={"devices": level.devices * r if level.devices else None,
                                         "bandwidth_gbps": level.bandwidth_gbps / r})
                for level in self.interconnect.levels]}),
        })
        _PER_RANK[id(self)] = (self, derived)
        return derived

    # ------------------------------------------------------------------ compute
    def peak_flops(self, dtype: str = "bf16") -> float:
        """Dense peak FLOP/s for ``dtype`` (``bf16``, ``fp8`` or ``fp32``)."""
        d = canonical_dtype(dtype)
        tflops = getattr(self.compute.peak_tflops, d)
        if tflops is None:
            raise InputError(
                f"hardware profile {self.name!r} has no {d} compute ({self.device.model}); "
                "choose another --precision (e.g. bf16) or another profile"
            )
        return tflops * 1e12

    # ------------------------------------------------------------------ memory
    def hbm_bytes(self) -> int:
        """Device memory capacity in bytes."""
        return int(self.memory.hbm_gib * 2**30)

    def hbm_bandwidth(self) -> float:
        """Achievable device-memory bandwidth, bytes/s (nominal x hbm_fraction)."""
        return self.memory.hbm_tbps * 1e12 * self.memory.hbm_fraction

    def host_memory_bytes(self) -> int:
        """Host memory available per device, bytes."""
        return int(self.host.memory_gib * 2**30)

    def host_bandwidth(self) -> float:
        """Achievable host<->device bandwidth per device and direction, bytes/s."""
        return self.host.link_gbps * 1e9 * self.host.link_fraction

    # ------------------------------------------------------------------ interconnect
    @property
    def levels(self) -> tuple[Level, ...]:
        return tuple(self.interconnect.levels)

    def level_index(self, level: int | str) -> int:
        """Index of a level given by index or by name."""
        levels = self.interconnect.levels
        if isinstance(level, str):
            for i, lv in enumerate(levels):
                if lv.name == level:
                    return i
            raise ValueError(f"profile {self.name!r} has no level {level!r}; levels: {[lv.name for lv in levels]}")
        if not 0 <= level < len(levels):
            raise ValueError(f"profile {self.name!r} has levels 0..{len(levels) - 1}, not {level}")
        return level

    def level_for_group(self, group_size: int, stride: int = 1, total_devices: int | None = None) -> int:
        """Index of the innermost level that holds every member of a communication group.

        Ranks are laid out as a row-major device mesh: a group of ``group_size`` members
        ``stride`` apart sits in an aligned block of ``group_size * stride`` consecutive
        devices. The group stays inside level *i* when that block divides the level's unit
        (``devices``), or when the whole job (``total_devices``) fits in one unit. A group of
        one needs no communication and reports level 0.
        """
        if group_size < 1 or stride < 1:
            raise ValueError(f"level_for_group: group_size={group_size} and stride={stride} must be >= 1")
        if group_size == 1:
            return 0
        block = group_size * stride
        for i, lv in enumerate(self.interconnect.levels):
            if lv.devices is None:
                return i
            if total_devices is not None and total_devices <= lv.devices:
                return i
            if block <= lv.devices and lv.devices % block == 0:
                return i
        top = self.interconnect.levels[-1]
        raise InputError(
            f"a group of {group_size} devices with stride {stride} spans {block} devices, more than the "
            f"largest interconnect level of profile {self.name!r} ({top.name}: {top.devices} devices); "
            "use fewer devices or a profile whose outermost level is unbounded"
        )

    def latency(self, level: int | str) -> float:
        """One-message latency of a level, seconds."""
        return self.interconnect.levels[self.level_index(level)].latency_us * 1e-6

    # ------------------------------------------------------------------ output
    def summary(self) -> dict[str, Any]:
        """A flat, JSON-friendly digest (for `xplan hw`)."""
        pk = self.compute.peak_tflops
        return {
            "device": self.device.model,
            "bf16_tflops": pk.bf16,
            "fp8_tflops": pk.fp8,
            "hbm_gib": self.memory.hbm_gib,
            "hbm_tbps": self.memory.hbm_tbps,
            "levels": ", ".join(
                f"{lv.name} x{lv.devices if lv.devices is not None else '*'} {_fmt(lv.bandwidth_gbps)} GB/s"
                for lv in self.interconnect.levels
            ),
            "ranks_per_device": self.device.ranks_per_device,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the YAML file's content), in schema order."""
        return self.model_dump(mode="python")

    def to_yaml(self) -> str:
        """YAML text that ``load_profile``/``profile_from_yaml`` reads back to an equal profile."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)


def canonical_dtype(dtype: Any) -> str:
    """``bf16``, ``fp8`` or ``fp32`` for any spelling of a compute dtype (``torch.bfloat16``,
    ``float8_e4m3fn``, ``float32`` ...); an InputError for anything else."""
    d = _DTYPE_ALIASES.get(str(dtype).lower())
    if d is None:
        raise InputError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return d


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
