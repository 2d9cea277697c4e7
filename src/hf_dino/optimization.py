"""Optimizer construction and the per-step parameter updates of DINO (clipping, EMA teacher)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def parameter_groups(model: nn.Module) -> list[dict]:
    """Two groups, weight-decayed first: matrices / conv kernels, then biases and norm weights
    (every 1-D parameter), which the reference excludes from weight decay. Frozen parameters
    are left out."""
    regularized, not_regularized = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.endswith(".bias") or parameter.ndim <= 1:
            not_regularized.append(parameter)
        else:
            regularized.append(parameter)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, sgd_momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW or SGD over `parameter_groups`; lr and weight decay are set every step by the schedules."""
    groups = parameter_groups(model)
    if name == "adamw":
        device_type = next(model.parameters()).device.type
        # The fused kernel updates every parameter in one call (CPU and CUDA); no per-parameter loop.
        return torch.optim.AdamW(groups, lr=0.0, fused=device_type in ("cpu", "cuda"))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=sgd_momentum, foreach=True)
    raise ValueError(f"optimizer {name!r} is unknown; use adamw or sgd")


@torch.no_grad()
def clip_gradients_per_parameter(parameters: Sequence[nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient to norm <= max_norm, independently (the reference's
    `clip_gradients`, not a global-norm clip), with foreach kernels and no host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch.stack(torch._foreach_norm(grads)).float()
    scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [scale.to(grad.dtype) for scale, grad in zip(scales.unbind(), grads)])


@torch.no_grad()
def ema_update(teacher_parameters: Sequence[torch.Tensor], student_parameters: Sequence[torch.Tensor],
               momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, one foreach kernel."""
    torch._foreach_lerp_(list(teacher_parameters), [p.detach() for p in student_parameters], 1.0 - momentum)


def cancel_last_layer_gradients(head: nn.Module) -> None:
    """Drop the gradients of the head's last layer (frozen during the first epoch(s))."""
    for parameter in head.last_layer.parameters():
        parameter.grad = None
