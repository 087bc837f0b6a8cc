"""Cost models: pure functions of (traced graph, layout, hardware profile) with breakdowns."""

from .compute import PricingContext
from .estimate import Estimate, estimate, fits_memory, host_capacity, memory_estimate, step_time
from .memory import MemoryBreakdown

__all__ = ["Estimate", "fits_memory", "host_capacity", "MemoryBreakdown", "PricingContext", "estimate", "memory_estimate", "step_time"]
