"""Routing imbalance: the busiest expert-parallel rank's routed load over the mean (>= 1).

Dropless MoE routes every token to its top-k experts, so the rank holding the most popular experts
computes, receives and keeps more than the mean: its expert GEMMs, its all-to-all traffic and its
routed activations scale with this factor (`cost_models.compute`, `comm`, `memory`). It is a
property of the model's routing and the data, not of the hardware.

Default (`DEFAULT_IMBALANCE`, EP groups of `MEASURED_MIN_EP` ranks or more): UltraEP (Wei et al., "UltraEP: Unleash MoE Training and Inference on
Rack-Scale Nodes with Near-Optimal Load Balancing", arXiv 2606.04101, 2026) measured the final
inter-rank imbalance (busiest rank's tokens over the mean) of MoE models from 106B to 671B
parameters, in training and prefill on large expert-parallel groups without a balancer, at 1.30 to
4.01. The lower end, 1.30, is the default for dropless training (aux-loss or bias balancing keeps
training at the low end; prefill and unbalanced routing reach the high end). It was measured on
large EP groups; for smaller groups no published measurement was found and they are priced
balanced, which the estimate says. Runs that force balanced routing
(Megatron's `moe_router_force_load_balancing`, used by Megatron-Bridge's benchmarks) have 1.0; a
run of `xplan run` measures its own (metrics.jsonl `ep_imbalance`), which `xplan whatif --set
imbalance=RUN_DIR` reuses.
"""

from __future__ import annotations

DEFAULT_IMBALANCE = 1.30
#: The smallest EP group the default was measured on: UltraEP balances large EP groups on rack-scale
#: nodes (its EP 32 to 72 configurations). Below it no published busiest-rank measurement was found:
#: such groups are priced balanced (1.0), and every MoE estimate says which applies.
MEASURED_MIN_EP = 32
IMBALANCE_SOURCE = ("UltraEP (arXiv 2606.04101): busiest EP rank's tokens / mean 1.30-4.01 without a balancer on "
                    "large EP groups, MoE models of 106B-671B in training and prefill; the low end taken")


def default_imbalance(layout, config) -> float:
    """The imbalance priced when none is given: `DEFAULT_IMBALANCE` for a mixture-of-experts model
    split over an EP group of the measured size (`MEASURED_MIN_EP` or more); 1 otherwise (no
    experts split, or a group smaller than any published measurement)."""
    if layout.ep >= MEASURED_MIN_EP and getattr(config, "num_experts", 0):
        return DEFAULT_IMBALANCE
    return 1.0


def imbalance_note(layout, config, imbalance: float, given: bool) -> str | None:
    """The line every MoE estimate prints about the routing imbalance it priced."""
    if not getattr(config, "num_experts", 0) or layout.ep <= 1:
        return None
    if given:
        return f"routing imbalance {imbalance:.2f} (busiest EP rank's routed load over the mean, as given)"
    if imbalance > 1:
        return (f"routing imbalance {imbalance:.2f} by default for EP {layout.ep} >= {MEASURED_MIN_EP} "
                f"({IMBALANCE_SOURCE}); set --imbalance, or measure it with xplan run (metrics ep_imbalance)")
    return (f"routing imbalance 1.00 by default: no published busiest-rank measurement at EP {layout.ep} < "
            f"{MEASURED_MIN_EP} (the {DEFAULT_IMBALANCE:.2f} default is for larger groups); set --imbalance, or "
            "measure it with xplan run (metrics ep_imbalance)")
