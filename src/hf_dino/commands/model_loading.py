"""The model of an evaluation command: the device it runs on (`default_device`) and its backbone,
loaded, or one usage error naming --model (`load_model_or_exit`)."""

from __future__ import annotations

from typing import Any

from ..cli import usage_error


def default_device(device: str | None = None) -> str:
    """`device`, or when None: "cuda" when a GPU is available, else "cpu" (every command's default)."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model_or_exit(name_or_path: str, device: str | None = None, **kwargs: Any):
    """`evaluation.load_frozen_backbone(name_or_path, device, **kwargs)` -> (model, native size); a
    model that cannot be loaded (no such folder, no Hub access, not a backbone) is one usage error
    naming --model. `device` None: `default_device()`."""
    from ..evaluation.features import load_frozen_backbone

    device = default_device(device)
    try:
        return load_frozen_backbone(name_or_path, device, **kwargs)
    except (OSError, ValueError) as error:
        usage_error(f"--model {name_or_path}: {str(error).splitlines()[0]}")
