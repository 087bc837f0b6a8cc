"""The device allocator a layout asks for (`layout.allocator`), set before the first allocation.

``expandable_segments``: PyTorch's caching allocator maps more physical memory into one growing
segment instead of allocating separate segments, so freed blocks merge and most fragmentation
(reserved but unusable memory) goes away. The cost model prices the profile's
``memory.fragmentation_expandable`` then, ``memory.fragmentation`` for ``caching``.

An option the user already gave (``PYTORCH_ALLOC_CONF`` / ``PYTORCH_CUDA_ALLOC_CONF`` naming
``expandable_segments``) is kept, with a warning when it differs from the plan. CPU has no
caching allocator: nothing to set. On Ascend, torch_npu reads ``PYTORCH_NPU_ALLOC_CONF``.
"""

from __future__ import annotations

import logging
import os

from .. import compat

log = logging.getLogger("xplan.runtime.distributed")

ENV_VARS = {"cuda": ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"), "npu": ("PYTORCH_NPU_ALLOC_CONF",)}


def user_setting(device_type: str) -> str | None:
    """The expandable_segments value the environment already sets ('True'/'False'), or None."""
    for name in ENV_VARS.get(device_type, ()):
        for option in os.environ.get(name, "").split(","):
            key, _, value = option.partition(":")
            if key.strip() == "expandable_segments":
                return value.strip()
    return None


def configure_allocator(choice: str, device_type: str) -> str:
    """Apply `choice` ('expandable_segments' | 'caching') on `device_type`; returns what is in
    effect ('expandable_segments', 'caching', or 'none' on cpu). Call before the model is built."""
    if device_type not in ENV_VARS:
        return "none"
    wanted = "True" if choice == "expandable_segments" else "False"
    given = user_setting(device_type)
    if given is not None:
        if given != wanted:
            log.warning("the environment sets expandable_segments:%s but the plan was priced with allocator=%s; "
                        "the measured peak may differ from the prediction", given, choice)
        return "expandable_segments" if given == "True" else "caching"
    if device_type == "npu":
        os.environ["PYTORCH_NPU_ALLOC_CONF"] = f"expandable_segments:{wanted}"
    else:
        compat.set_allocator_settings(f"expandable_segments:{wanted}")
    log.info("allocator: expandable_segments:%s on %s", wanted, device_type)
    return choice


__all__ = ["configure_allocator", "user_setting"]
