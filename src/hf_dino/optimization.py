"""Optimizer construction and the per-step parameter updates of DINO (clipping, EMA teacher)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def parameter_groups(model: nn.Module) -> list[dict]:
    """Parameter groups, each tagged for the per-step schedules:

    - "apply_weight_decay": matrices / conv kernels get the scheduled weight decay; biases and
      norm weights (every 1-D parameter) get none, as in the reference;
    - "last_layer": the head's last layer (`head.last_layer.*`), which the step freezes (lr 0)
      during the first `freeze_last_layer` epochs. A separate group is what keeps it frozen under
      DeepSpeed, whose optimizer applies weight decay even to zeroed gradients.

    Frozen parameters are left out, and so are empty groups (DeepSpeed cannot flatten them).
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        apply_weight_decay = not (name.endswith(".bias") or parameter.ndim <= 1)
        last_layer = ".last_layer." in f".{name}"
        buckets.setdefault((apply_weight_decay, last_layer), []).append(parameter)
    groups = []
    for apply_weight_decay, last_layer in ((True, False), (False, False), (True, True), (False, True)):
        params = buckets.get((apply_weight_decay, last_layer))
        if params:
            groups.append({"params": params, "apply_weight_decay": apply_weight_decay, "last_layer": last_layer,
                           **({} if apply_weight_decay else {"weight_decay": 0.0})})
    return groups


def set_step_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                             last_layer_frozen: bool) -> None:
    """This step's lr and weight decay on every group of `parameter_groups`: lr 0 for the last
    layer while it is frozen (so neither the update nor the decoupled weight decay moves it),
    weight decay only where it applies."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if (last_layer_frozen and group.get("last_layer")) else lr
        group["weight_decay"] = weight_decay if group.get("apply_weight_decay", True) else 0.0


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
    """teacher <- momentum * teacher + (1 - momentum) * student, in the teacher's dtype (fp32).

    Under FSDP2 the teacher is sharded exactly like the student, so the update runs shard by
    shard on each process's local pieces: the EMA is element-wise, so updating the shards is
    updating the whole, with no gather and no communication. (Gathering the student's full
    parameters into a replicated teacher would cost an extra all-gather per step and a full
    teacher copy per GPU, which is what sharding is there to avoid.)

    Under DeepSpeed bf16 the student module holds bf16 weights (the engine keeps the fp32
    master copy, partitioned across processes under ZeRO-1/2) while the teacher stays fp32:
    student tensors of another dtype are cast to the teacher's, one tensor at a time, and the
    teacher is updated in fp32. The teacher then follows the bf16 rounding of the student's
    weights; its error stays below the bf16 rounding of the weights (relative 2^-9) because an EMA
    is a convex combination: it does not accumulate over steps.
    """
    teachers = [local_shard(p) for p in teacher_parameters]
    students = [local_shard(p.detach()) for p in student_parameters]
    same_dtype = [t.dtype == s.dtype for t, s in zip(teachers, students)]
    if all(same_dtype):
        torch._foreach_lerp_(teachers, students, 1.0 - momentum)
        return
    for teacher, student, same in zip(teachers, students, same_dtype):
        teacher.lerp_(student if same else student.to(teacher.dtype), 1.0 - momentum)


def cancel_last_layer_gradients(head: nn.Module) -> None:
    """Drop the gradients of the head's last layer (frozen during the first epoch(s))."""
    for parameter in head.last_layer.parameters():
        parameter.grad = None
