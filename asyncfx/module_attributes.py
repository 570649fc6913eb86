"""Names of attributes that torch, accelerate and diffusers keep on a module, read by the
partitioner (once per capture) and by the runtime (at every call)."""
from __future__ import annotations

from typing import Any

#: Where nn.Module keeps its parameters, buffers and submodules.
MODULE_REGISTRIES = frozenset({"_parameters", "_buffers", "_modules"})
#: accelerate's hook on a module (model or sequential CPU offloading, ``device_map``).
ACCELERATE_HOOK = "_hf_hook"
#: diffusers' hook registry on a module (offloading, layerwise casting, caching, layer skipping).
DIFFUSERS_HOOKS = "_diffusers_hook"


def diffusers_hook_names(module: Any) -> list[str]:
    """The names of the diffusers hooks on ``module`` itself (none once they are removed).

    Example:
        >>> diffusers_hook_names(torch.nn.Linear(2, 2))
        []
    """
    return list(getattr(module.__dict__.get(DIFFUSERS_HOOKS), "hooks", None) or {})
