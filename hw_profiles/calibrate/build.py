"""Assembling a calibration into a profile: the measurements and the constants fitted to them
(``Fitted``) become a validated ``Profile`` whose every number names its measurement."""

from __future__ import annotations

import datetime
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..loader import profile_from_dict
from ..schema import COLLECTIVES, Profile
from .benches import AttentionResult, MatmulResult
from .collectives import backend_for
from .sweeps import Setup
from .timing import device_name


@dataclass(frozen=True)
class Fitted:
    """The constants ``xplan.cost_models.fit.fit_calibration`` fits to a calibration's
    measurements, in SI units."""

    kernel_overhead_s: float  # seconds per eager kernel beyond its bytes and FLOPs
    memory_bw: float  # bytes/s of out-of-place elementwise ops
    peak_flops: dict[str, float | None]  # per dtype; None: not measured
    attention_dtype: str  # the dtype whose peak the attention fractions are of
    attention: dict[str, tuple[float, float]]  # "forward" / "backward": (max_fraction, half_seq)
    collectives: dict[str, Any] | None  # per_kind, latency_s, busbw; None: no collectives measured


def _sig(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (readable YAML, no false precision)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 1.0


@dataclass
class Calibration:
    """A calibrated profile with the YAML header naming its command, the raw measurements and
    the fitted constants."""

    profile: Profile
    header: str
    measurements: dict[str, Any]
    fits: dict[str, Any] = field(default_factory=dict)

    def yaml_text(self) -> str:
        return "".join(f"# {line}".rstrip() + "\n" for line in self.header.splitlines()) + self.profile.to_yaml()

    def summary(self) -> dict[str, Any]:
        p = self.profile
        lv = p.interconnect.levels[0]
        return {
            "name": p.name,
            "device": p.device.model,
            "processes": self.fits["processes"],
            "threads": self.fits["threads"],
            "peak_tflops": {d: getattr(p.compute.peak_tflops, d) for d in ("fp32", "bf16", "fp8")},
            "kernel_overhead_us": p.compute.gemm.overhead_us,
            "memory_gbps": p.memory.hbm_tbps * p.memory.hbm_fraction * 1e3,
            "copy_gbps": self.fits["copy_gbps"],
            "host_link_gbps": p.host.link_gbps * p.host.link_fraction,
            "attention_fraction": {"forward": p.compute.attention.forward.max_fraction,
                                   "backward": p.compute.attention.backward.max_fraction},
            "collective_busbw_gbps": {k: lv.bandwidth_gbps * getattr(lv.fraction, k) for k in COLLECTIVES},
            "collective_latency_us": lv.latency_us,
        }


def build_profile(data: dict[str, Any], setup: Setup, fitted: Fitted, name: str, command: str = "xplan calibrate",
                  host: str | None = None, date: str | None = None) -> Calibration:
    """A validated profile from the measurements (``measure``) and the constants fitted to them
    (``xplan.cost_models.fit.fit_calibration``), every number naming its measurement."""
    host = host or socket.gethostname() or "localhost"
    date = date or datetime.date.today().isoformat()
    cpu = setup.device == "cpu"
    model = device_name(setup.device)
    cores = os.cpu_count() or 1
    n = setup.processes
    ranks = f"{n} process{'es' if n > 1 else ''}" + (f" x {setup.threads} thread(s)" if cpu else "")
    where = (f"`{command}` ({ranks}, {'custom' if setup.custom_sweep else 'quick' if setup.quick else 'full'} sweep, median of "
             f"{setup.sweep.repeats} repeats, torch {torch.__version__})")

    def src(what: str) -> str:
        return f"measured by xplan calibrate on {host} {date}: {what}; {where}"

    over = data["overhead"]
    overhead = fitted.kernel_overhead_s
    elem = data["elementwise"]
    mem_bw = fitted.memory_bw
    copy_bw = data["copy_bw"]
    gemms = [MatmulResult(**r) for r in data["gemm"]]
    peaks = fitted.peak_flops
    att_dtype = fitted.attention_dtype
    att = [AttentionResult(**r) for r in data["attention"] if r["dtype"] == att_dtype]
    (fa, fh), (ba, bh) = fitted.attention["forward"], fitted.attention["backward"]
    # host link: on CPU host and device are one memory
    if cpu:
        link_bw = copy_bw
    else:
        link_bw = min(data["host_link"]["h2d"], data["host_link"]["d2h"])
    # collectives: the level's nominal bandwidth is the best of them, each kind a fraction of it
    world = int(data.get("collective_world") or 0)
    cf = fitted.collectives
    if cf is not None:
        nominal = max([copy_bw, *cf["busbw"].values()]) if cpu else max(cf["busbw"].values())
        fractions = {k: _sig(min(1.0, max(1e-4, cf["busbw"][k] / nominal))) for k in COLLECTIVES}
        latency = cf["latency_s"]
    else:
        nominal, latency = link_bw, 0.0
        fractions = {k: 1.0 for k in COLLECTIVES}

    if cpu:
        ram = _ram_gib()
        hbm_gib = host_gib = ram / n
        mem_note = f"physical RAM {ram:.1f} GiB / {n} process(es): the ranks share it"
        host_note = "the same RAM as device memory on CPU (host and device are one memory)"
    else:
        hbm_gib = getattr(torch, setup.device).get_device_properties(0).total_memory / 2**30
        host_gib = _ram_gib() / max(1, n)
        mem_note = f"total_memory of {model} from torch.{setup.device}.get_device_properties"
        host_note = f"physical RAM {_ram_gib():.1f} GiB / {n} device(s)"

    def rows(rs: Sequence[MatmulResult]) -> str:
        return ", ".join(f"{r.groups}x" * (r.groups > 1) + f"{r.m}x{r.n}x{r.k}{'' if r.layout == 'nt' else r.layout}"
                         f" {r.tflops * 1e3:.3g}" for r in rs)

    threads_note = (f"one process with {setup.threads} of the {cores} CPU threads"
                    + (f", {n} such ranks running at once" if n > 1 else "") if cpu else f"one {model}")
    ranks_note = f"one rank of `xplan run` with {n} process{'es' if n > 1 else ''} on this machine: {threads_note}"
    profile_data = {
        "schema_version": 1,
        "name": name,
        "description": (f"{model}, measured by xplan calibrate on {host} {date} for {n}-process runs"
                        + (f" ({setup.threads} thread(s) per process of {cores})" if cpu else "")
                        + (f"; {backend_for(setup.device)} collectives between {world} local processes"
                           if cf is not None else "; no collectives measured (one device)")),
        "device": {"kind": "cpu" if cpu else ("npu" if setup.device == "npu" else "gpu"), "model": model,
                   "definition": ranks_note, "ranks_per_device": 1},
        "compute": {
            "peak_tflops": {d: (_sig(peaks[d] / 1e12) if peaks.get(d) else None) for d in ("bf16", "fp8", "fp32")},
            "gemm": {"max_fraction": {d: (1.0 if peaks.get(d) else None) for d in ("bf16", "fp8", "fp32")},
                     "overhead_us": _sig(overhead * 1e6)},
            "attention": {
                "forward": {"max_fraction": _sig(min(1.0, fa)), "half_seq": _sig(fh)},
                "backward": {"max_fraction": _sig(min(1.0, ba)), "half_seq": _sig(bh)},
            },
        },
        "memory": {"hbm_gib": _sig(hbm_gib), "hbm_tbps": _sig(mem_bw / 1e12), "hbm_fraction": 1.0},
        "host": {"memory_gib": _sig(host_gib), "link_gbps": _sig(link_bw / 1e9), "link_fraction": 1.0},
        "interconnect": {"levels": [{
            "name": "local",
            "devices": None,
            "topology": "switch",
            "bandwidth_gbps": _sig(nominal / 1e9),
            "latency_us": _sig(latency * 1e6),
            "fraction": fractions,
        }]},
    }
    gemm_by_dtype = {d: [r for r in gemms if r.dtype == d] for d in ("fp32", "bf16")}
    impls = sorted({r.impl for r in gemms if r.groups > 1})
    sources = {
        "device.ranks_per_device": "one process (rank) per device on this machine",
        "compute.peak_tflops": src(
            "per dtype, the FLOP/s that fits max(FLOPs/peak, bytes/bw) + overhead_us best (relative least squares) "
            "to the GEMM sweep (shapes faster than 4 x overhead_us left out), GFLOPS per m x n x k (layout nt = x @ W^T unless marked; GxMxNxK = grouped over G "
            f"experts with {', '.join(impls) or 'no grouped GEMM'}): "
            + "; ".join(f"{d} [{rows(rs)}]" for d, rs in gemm_by_dtype.items() if rs)
            + "; fp8: not measured (null)"),
        "compute.gemm.max_fraction": "1.0 by definition: peak_tflops is itself fitted to measured GEMMs",
        "compute.gemm.overhead_us": src(
            "seconds per aten kernel (counted as the tracer counts them: views excluded) of the forward+backward of "
            "a tiny decoder block in eager model code, median over sizes: "
            + ", ".join(f"{int(r['numel'])} elements {r['seconds_per_kernel'] * 1e6:.3g} us ({int(r['kernels'])} "
                        "kernels)" for r in over if r.get("kind", "block") == "block")
            + "; bare elementwise chain under autograd for comparison: "
            + ", ".join(f"{int(r['numel'])} elements {r['seconds_per_kernel'] * 1e6:.3g} us" for r in over
                        if r.get("kind") == "chain")),
        "compute.attention": src(
            f"fitted max*s/(s+half) to causal scaled_dot_product_attention in {att_dtype} (b{setup.sweep.attention_shape[0]}"
            f" h{setup.sweep.attention_shape[1]} d{setup.sweep.attention_shape[2]}; model FLOPs: causal half, backward 2x"
            f" forward; minus overhead_us) vs the {att_dtype} peak, fwd/bwd GFLOPS at seq "
            + ", ".join(f"{r.seq_len}: {r.fwd_tflops * 1e3:.3g}/{r.bwd_tflops * 1e3:.3g}" for r in att)
            + (" (the cost model applies one efficiency to every dtype; bf16 GFLOPS "
               + ", ".join(f"{r['seq_len']}: {r['fwd_flops'] / r['fwd_seconds'] / 1e9:.3g}/"
                           f"{2 * r['fwd_flops'] / r['bwd_seconds'] / 1e9:.3g}"
                           for r in data["attention"] if r["dtype"] == "bf16") + ")" if cpu else "")),
        "memory.hbm_gib": mem_note,
        "memory.hbm_tbps": src(
            "bytes/s fitted (log space: geometric mean) to out-of-place fp32 elementwise ops with fresh outputs "
            "(read + written bytes), "
            + ", ".join(f"{r['op']} {r['mib']:g} MiB {r['bytes'] / r['seconds'] / 1e9:.3g} GB/s" for r in elem)
            + f"; STREAM copy_ of {setup.sweep.copy_mib} MiB: {copy_bw / 1e9:.3g} GB/s"),
        "memory.hbm_fraction": "1.0: hbm_tbps is itself measured",
        "host.memory_gib": host_note,
        "host.link_gbps": (src(f"on CPU host and device are the same memory: the host link is a RAM copy, the STREAM "
                               f"copy_ bandwidth of {setup.sweep.copy_mib} MiB ({copy_bw / 1e9:.3g} GB/s)") if cpu else
                           src(f"pinned copies of {setup.sweep.copy_mib // 4} MiB, the slower direction (host->device "
                               f"{data['host_link']['h2d'] / 1e9:.3g} GB/s, device->host "
                               f"{data['host_link']['d2h'] / 1e9:.3g} GB/s)")),
        "host.link_fraction": "1.0: link_gbps is itself measured",
        "interconnect.levels[0].devices": "null: any number of local processes",
    }
    if cf is not None:
        per = cf["per_kind"]
        sources["interconnect.levels[0].bandwidth_gbps"] = src(
            ("nominal = the largest of the STREAM copy bandwidth (the memory gloo moves data through) and the fitted "
             "bus bandwidths" if cpu else "nominal = the best fitted bus bandwidth")
            + f" ({nominal / 1e9:.3g} GB/s)")
        sources["interconnect.levels[0].latency_us"] = src(
            f"alpha of one alpha-beta fit over every kind and size ({backend_for(setup.device)}, {world} processes; "
            "t = ring steps x alpha + traffic / busbw_kind, relative least squares)")
        sources["interconnect.levels[0].fraction"] = src(
            f"fitted bus bandwidth per kind / the nominal bandwidth, {backend_for(setup.device)} between {world} "
            f"processes, sizes {', '.join(f'{k} KiB' for k in setup.sweep.collective_kib)}; per kind alone: "
            + ", ".join(f"{k} {per[k][1] / 1e9:.3g} GB/s + {per[k][0] * 1e6:.3g} us/step" for k in per))
    else:
        for key in ("bandwidth_gbps", "latency_us", "fraction"):
            sources[f"interconnect.levels[0].{key}"] = (
                "assumed: no collectives measured (a single device); a one-device job never communicates, and "
                "these are the host-link bandwidth and zero latency")
    profile_data["sources"] = sources
    header = (f"Measured on this machine by `{command}` on {date} ({host}).\n"
              f"One device = {ranks_note}.\n"
              "Re-run that command to refresh it; numbers are this machine's, not a vendor's.")
    fits = {"processes": n, "threads": setup.threads, "device": setup.device, "kernel_overhead_s": overhead,
            "memory_bw": mem_bw, "copy_gbps": copy_bw / 1e9, "peak_flops": peaks,
            "attention_dtype": att_dtype, "collectives": cf}
    profile = profile_from_dict(profile_data, origin="calibrated profile")
    return Calibration(profile, header, data, fits)

