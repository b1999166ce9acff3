"""State-dict helpers shared by the model loaders (``resnet.load_resnet_checkpoint``) and
``deeplab_v1.weights`` (which builds on this package, never the other way round)."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["DATA_PARALLEL_PREFIX", "strip_module_prefix"]

#: The prefix ``nn.DataParallel`` / ``DistributedDataParallel`` put before every key (the wrapped model
#: is their ``.module``).
DATA_PARALLEL_PREFIX = "module."


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict without the ``module.`` prefix when every key has it (a DataParallel checkpoint);
    otherwise a plain copy. Values are not copied."""
    n = len(DATA_PARALLEL_PREFIX)
    if state_dict and all(isinstance(k, str) and k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict):
        return {k[n:]: v for k, v in state_dict.items()}
    return dict(state_dict)
