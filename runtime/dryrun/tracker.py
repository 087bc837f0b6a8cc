"""The dry run's memory tracker: FSDPMemTracker (through `runtime.compat`) with the categories the
cost model prices and one peak per moment.

Changes to FSDPMemTracker's accounting: tensors DTensor creates to propagate shapes (global-shape
outputs computed under the same fake mode) are not counted; every FSDP2 all-gather output and
reduce-scatter input is labelled as such (explicit backward prefetch runs outside the hook
FSDPMemTracker watches); tensors made inside the LM head (the loss), by expert-parallel or Ulysses
all-to-alls and by the optimizer step (outside its states) get their own categories; the expert
units' FSDP2 hooks are put back inside their selective-recompute guards (the tracker re-registers
them first/last); and peaks are kept per moment (phase and running decoder layer) with their
breakdown and module. Components (`COMPONENTS`) use the cost model's names; a component sum equals
the peak.

Host offload is simulated: copies the offload code makes in host memory are labelled `HOST` (and,
with ``offload: params``, FSDP2's sharded parameters, gradients and optimizer states count as host
memory, where its CPU offload keeps them), so every moment has a device peak (what the component
sum equals) and, beside it, the host bytes alive then.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import compat

# Components, in the cost model's names (cost_models.memory.MemoryBreakdown) plus `communication`.
COMPONENTS = ("parameters", "gradients", "optimizer", "gathered_parameters", "activations", "logits_loss",
              "temporaries", "communication", "overhead")

# Extra tracker categories (FSDPMemTracker's own are the _FSDPRefType values).
OPT_TEMP, LOSS, COMM, COMM_FWD = "Optimizer Temp", "Loss", "Communication", "Communication (forward)"
HOST, HOST_STATES = "Host", "Host (states)"  # copies in host memory: activations, optimizer moments
# Categories FSDP2's CPU offload (offload: params) keeps in host memory.
PARAMS_OFFLOAD_HOST = ("Sharded Param", "Sharded Grad", "OptState")

# Tracker category -> component.
_CATEGORY_COMPONENT = {
    "Sharded Param": "parameters",
    "Buffer": "parameters",
    "Sharded Grad": "gradients",
    "OptState": "optimizer",
    "Unsharded Param": "gathered_parameters",
    "All Gather": "gathered_parameters",
    "Activation": "activations",
    "Inputs": "activations",
    LOSS: "logits_loss",
    "Temp": "temporaries",
    "Unsharded Grad": "temporaries",
    "Reduce Scatter": "temporaries",
    OPT_TEMP: "temporaries",
    COMM: "communication",
    COMM_FWD: "activations",  # all-to-all outputs made in forward live on only as saved activations
}

# A decoder layer's index in a module name ("model.layers.7.mlp" -> 7).
LAYER = re.compile(r"\.layers\.(\d+)(?:\.|$)")


HOST_COMPONENTS = ("activations", "model_states")


def host_components_of(categories: dict[str, float]) -> dict[str, float]:
    """Host categories (bytes) -> host components: offloaded activations and model states."""
    out = dict.fromkeys(HOST_COMPONENTS, 0.0)
    for name, value in categories.items():
        out["activations" if name == HOST else "model_states"] += value
    return out


def components_of(categories: dict[str, float]) -> dict[str, float]:
    """Tracker categories (bytes) -> components (bytes)."""
    out = dict.fromkeys(COMPONENTS, 0.0)
    for name, value in categories.items():
        out[_CATEGORY_COMPONENT.get(name, "temporaries")] += value
    return out


@dataclass
class PhasePeak:
    """The largest tracked device total of one moment (phase, running layer) and the breakdown then
    (bytes by tracker category; they sum to `bytes`); `host`: the host bytes by category at the
    moment's largest host total (offload)."""

    bytes: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    where: str = ""
    host: dict[str, int] = field(default_factory=dict)

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())


@dataclass
class Measured:
    """One dry run's peaks: (phase, moment key of the running decoder layer, or None) -> peak."""

    moments: dict[tuple, PhasePeak]
    micro_batches: int
    timings: dict[str, float]


@functools.cache
def tracker_class() -> type:
    """`DryRunMemTracker` (built on first use: its base comes from torch's private `_tools`)."""
    base = compat.mem_tracker_base()
    ref = base.Ref
    all_to_all = compat.all_to_all_overloads()

    class DryRunMemTracker(base):
        """FSDPMemTracker with loss / all-to-all / optimizer-temporary categories and per-moment peaks."""

        extra_categories = (OPT_TEMP, LOSS, COMM, COMM_FWD, HOST, HOST_STATES)

        def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, head: nn.Module | None,
                     host_categories: tuple[str, ...] = (), zero1_host: bool = False):
            self.zero1_host = zero1_host  # ZeRO-1's fp32 masters live in host memory (offload)
            super().__init__(model, optimizer)
            self._head = head
            self.host_categories = {HOST, HOST_STATES, *host_categories}
            self.stage = "forward"  # set by the driver: 'step' (micro-batches) or 'optimizer'
            # (phase, index of the running decoder layer or None) -> peak; reduced-depth runs
            # extrapolate each of these moments separately (the maximum of them is not linear).
            self.peaks: dict[tuple[str, int | None], PhasePeak] = {}

        def on_hooks_registered(self) -> None:
            restore_recompute_guard_order(self.root_module)
            self._label_zero1_state()

        def _label_zero1_state(self) -> None:
            """ZeRO-1 has no FSDP2 units for FSDPMemTracker to find: its replicated parameters and
            fp32 master shards are parameters, its fp32 gradient buffers (made during backward)
            gradients."""
            from xplan.runtime.distributed import zero1_of

            zero = zero1_of(self.root_module)
            if zero is None:
                return
            for item in zero.parameters:
                self.label(item.param, ref.SHARDED_PARAM)
                self.label(item.master, HOST_STATES if self.zero1_host else ref.SHARDED_PARAM)
            if self._label_gradient not in zero.gradient_observers:
                zero.gradient_observers.append(self._label_gradient)

        def _label_gradient(self, grad: torch.Tensor) -> None:
            self.label(grad, ref.SHARDED_GRAD)

        def label_accumulated_grads(self) -> None:
            """Gradients kept unsharded across micro-batches (gradient sync deferred, fsdp == 1) are
            the gradient state, not backward temporaries: label them as gradients."""
            for grad in compat.fsdp_unsharded_grads(self.root_module):
                self.label(grad, ref.SHARDED_GRAD)

        def _phase(self) -> str:
            if self.in_optimizer_step or self.stage == "optimizer":
                return "optimizer"
            return "backward" if self.in_backward else "forward"

        def _in_head(self) -> bool:
            if self._head is None:
                return False
            name = self.module_name(self._head)
            return name is not None and name in self.running_modules

        def _block(self, phase: str) -> int | None:
            """Index (in this model) of the decoder layer running now: the innermost one the module
            tracker lists (backward hooks can lag by one layer: newest = lowest index there)."""
            found = [int(m.group(1)) for p in self.running_modules if (m := LAYER.search(p))]
            if not found:
                return None
            return min(found) if phase == "backward" else max(found)

        def category_of(self, func):
            if self.in_optimizer_step:
                return OPT_TEMP  # states are relabelled OptState by the step's post-hook
            if func in all_to_all:
                return COMM if self.in_backward and not self.in_recompute else COMM_FWD
            if self._in_head():
                return LOSS
            if self.in_backward and not self.in_recompute:
                return ref.TEMP
            return ref.ACT

        def label_host(self, tensor: torch.Tensor) -> None:
            self.label(tensor, HOST)

        def label_host_states(self, tensor: torch.Tensor) -> None:
            self.label(tensor, HOST_STATES)

        def label_restored(self, tensor: torch.Tensor) -> None:
            self.label(tensor, ref.ACT)  # an activation copied back for backward, not a temporary

        def on_memory_change(self) -> None:  # peaks per (phase, running block) only
            for snapshot in self.snapshots():
                categories = {str(getattr(k, "value", k)): v for k, v in snapshot.items() if k != "Total"}
                host = {k: v for k, v in categories.items() if k in self.host_categories and v}
                device = {k: v for k, v in categories.items() if k not in self.host_categories}
                total = snapshot["Total"] - sum(host.values())
                phase = self._phase()
                key = (phase, self._block(phase))
                peak = self.peaks.get(key)
                if peak is None:
                    peak = self.peaks[key] = PhasePeak()
                if total > peak.bytes:
                    parents = sorted(p for p in self.running_modules if p != "Global")
                    peak.bytes = total
                    peak.categories = device
                    peak.where = max(parents, key=len) if parents else "(top level)"
                if sum(host.values()) > peak.host_bytes:
                    peak.host = host

    return DryRunMemTracker


def restore_recompute_guard_order(model: nn.Module) -> None:
    """Put FSDP2's (now tracker-wrapped) hooks of expert units back inside their recompute guards.

    `run_fsdp_hooks_outside_recompute` brackets an expert unit's FSDP2 hooks with hooks that pop
    the selective-recompute modes; FSDPMemTracker re-registers FSDP2's forward pre-hook first and
    its forward hook last, outside the brackets, which breaks selective recompute (FSDP2's ops
    would be recorded in the forward and missing in the recompute). Order wanted:
    pre-hooks [leave, FSDP, reenter, ...], forward hooks [leave, FSDP, reenter].
    """
    from xplan.runtime.distributed.expert_parallel import _OutsideRecomputeRegion

    def guard(name: str):
        def matches(hook) -> bool:
            return isinstance(getattr(hook, "__self__", None), _OutsideRecomputeRegion) and hook.__name__ == name
        return matches

    for module in model.modules():
        compat.move_forward_hooks(module, first_pre_hooks=guard("leave"), last_hooks=guard("reenter"))


__all__ = ["COMPONENTS", "HOST", "HOST_COMPONENTS", "HOST_STATES", "LAYER", "PARAMS_OFFLOAD_HOST", "Measured", "PhasePeak",
           "components_of", "host_components_of", "restore_recompute_guard_order", "tracker_class"]
