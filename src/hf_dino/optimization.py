"""Optimizer construction and the per-step parameter updates of DINO (clipping, EMA teacher)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


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


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this process holds: a DTensor's local shard (FSDP2 parameters and
    gradients), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def clip_gradients_per_parameter(parameters: Sequence[nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient to norm <= max_norm, independently (the reference's
    `clip_gradients`, not a global-norm clip), with foreach kernels and no host sync.

    Sharded (FSDP2) gradients: each process computes the squared norms of its shards, one
    all-reduce sums them into every parameter's full norm, and each shard is scaled locally.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    sharded = isinstance(grads[0], DTensor)
    local_grads = [local_shard(grad) for grad in grads]
    norms = torch.stack(torch._foreach_norm(local_grads)).float()
    if sharded:
        squared = norms.square()
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=grads[0].device_mesh.get_group())
        norms = squared.sqrt()
    scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local_grads, [scale.to(grad.dtype) for scale, grad in zip(scales.unbind(), local_grads)])


@torch.no_grad()
def ema_update(teacher_parameters: Sequence[torch.Tensor], student_parameters: Sequence[torch.Tensor],
               momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, one foreach kernel.

    Under FSDP2 the teacher is sharded exactly like the student, so the update runs shard by
    shard on each process's local pieces: the EMA is element-wise, so updating the shards is
    updating the whole, with no gather and no communication. (Gathering the student's full
    parameters into a replicated teacher would cost an extra all-gather per step and a full
    teacher copy per GPU, which is what sharding is there to avoid.)
    """
    torch._foreach_lerp_([local_shard(p) for p in teacher_parameters],
                         [local_shard(p.detach()) for p in student_parameters], 1.0 - momentum)


def cancel_last_layer_gradients(head: nn.Module) -> None:
    """Drop the gradients of the head's last layer (frozen during the first epoch(s))."""
    for parameter in head.last_layer.parameters():
        parameter.grad = None
