"""Training on several processes: the process group, the engines (DDP, DeepSpeed ZeRO-2, FSDP2)
and what the DINO parts need of them.

- Collectives with gradients (`all_reduce_with_gradients`, `gather_rows_with_gradients`): the
  batch statistics of a synchronised batch norm and the global batch of the KoLeo term, so that
  N processes x B images train like 1 process x N*B.
- `ProcessGroupBatchNorm`: batch norm over the global batch on any device. torch's SyncBatchNorm
  runs on GPUs only; `synchronize_batch_norms` picks one or the other.
- `agreed_batches`: every process takes the same decision about each batch (train it, skip it,
  or end the epoch), so that no collective waits for a process that left the step.
- Engines: `prepare_teacher` places the EMA teacher for DDP / DeepSpeed / FSDP2,
  `exportable_teacher` gathers a sharded one, `configure_deepspeed_batch` and
  `freeze_last_layer_under_deepspeed` adapt DeepSpeed, whose engine owns the gradients.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- the process group
def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce ("sum" or "max") over `group` (default: all processes) when there are
    several processes; returns `tensor`."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return tensor


def cpu_process_group_arguments() -> dict:
    """`Accelerator` arguments for several processes on a machine without a GPU (CI, tests).

    Plain data parallelism (torchrun, or `accelerate launch --multi_gpu` there): Accelerate forms
    a gloo group only when told to use the CPU (`cpu=True`). A DeepSpeed launch must keep its
    engine, which `cpu=True` would replace by plain data parallelism: it gets the gloo backend
    instead (without any, Accelerate would count a single process). Accelerate runs FSDP on GPUs
    only: an FSDP launch on CPUs falls back to plain data parallelism (`warn_fsdp_on_cpu` says so).
    {} with a GPU or one process.
    """
    from accelerate.utils import InitProcessGroupKwargs

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def warn_if_launched_as_one_process() -> None:
    """`accelerate launch --num_processes N` without `--multi_gpu` on a machine without GPUs starts ONE
    process (Accelerate's simple launcher, meant for mpirun); say how to get N."""
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if launched_by_accelerate and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        logger.warning("accelerate launch started a single process: without GPUs, add --multi_gpu "
                       "(`accelerate launch --multi_gpu --num_processes N ...`) to run N processes (gloo)")


def warn_fsdp_on_cpu(accelerator) -> None:
    """Accelerate prepares FSDP on GPUs only: an FSDP launch on CPUs trains as plain data parallelism
    (DDP). Say so in the log rather than let the run pass for an FSDP one."""
    launched_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if launched_fsdp and not is_fsdp(accelerator) and accelerator.device.type == "cpu":
        logger.warning("FSDP was requested (ACCELERATE_USE_FSDP) but Accelerate sets FSDP up on GPUs only: "
                       "on these CPU processes the run trains as plain data parallelism (DDP), with the same "
                       "results as FSDP up to float rounding, and no parameter sharding")


# ---------------------------------------------------------------------- collectives with gradients
class _AllReduceSum(torch.autograd.Function):
    """y = sum over processes of x; the gradient of x is the sum over processes of the gradients
    of y (every process's loss depends on every process's x)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_gradients(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes, differentiable (the identity on one process).

    With data parallelism (each process's gradients averaged over N processes by DDP or
    DeepSpeed), a loss that depends on the sum trains exactly as one process holding every
    process's inputs."""
    return _AllReduceSum.apply(tensor) if is_distributed() else tensor


class _GatherRows(torch.autograd.Function):
    """Rows of every process concatenated in rank order, also when processes hold different numbers
    of rows; the gradient of a process's rows is the sum over processes of the gradients of its
    slice of the result."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = torch.zeros(world, dtype=torch.long, device=tensor.device)
        sizes[rank] = tensor.shape[0]
        dist.all_reduce(sizes)
        sizes = sizes.tolist()
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded.contiguous())
        ctx.start, ctx.size = sum(sizes[:rank]), tensor.shape[0]
        return torch.cat([rows[:size] for rows, size in zip(gathered, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.start + ctx.size]


def gather_rows_with_gradients(tensor: torch.Tensor) -> torch.Tensor:
    """(n_rank, ...) on each process -> (sum of n_rank, ...), the same on every process, in rank
    order, differentiable (see `all_reduce_with_gradients` for why the gradients are summed).
    The identity on one process."""
    return _GatherRows.apply(tensor) if is_distributed() else tensor


@torch.no_grad()
def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """`gather_rows_with_gradients` without gradients: every process's rows, in rank order."""
    return _GatherRows.apply(tensor) if is_distributed() else tensor


# ---------------------------------------------------------------------- batch norm over processes
class ProcessGroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch, on any device.

    In training mode with several processes, the per-channel mean and (biased) variance are taken
    over every process's batch: two all-reduces with gradients (sums and counts, then the squared
    deviations from the global mean), so the backward pass also crosses processes, as the
    reference's SyncBatchNorm does. The running statistics use the global count (unbiased
    variance). One process, or evaluation mode: plain batch norm. Input (N, C) or (N, C, *);
    computed in float32, returned in the input's dtype. torch's `nn.SyncBatchNorm` does the same
    on GPUs only; this one serves CPU processes (gloo).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        reduce_dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        values = input.float()
        local_count = values.new_tensor([input.numel() // input.shape[1]])
        sums = all_reduce_with_gradients(torch.cat([values.sum(reduce_dims), local_count]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = values - mean.view(shape)
        variance = all_reduce_with_gradients(centred.square().sum(reduce_dims)) / count
        output = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = variance.detach() * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return output.to(input.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """`module` with every batch norm replaced by a `ProcessGroupBatchNorm` holding the same
        parameters and buffers (as `nn.SyncBatchNorm.convert_sync_batchnorm` does); the state
        dict keeps its keys."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (cls, nn.SyncBatchNorm)):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
            if module.affine:
                converted.weight, converted.bias = module.weight, module.bias
            if module.track_running_stats:
                converted.running_mean, converted.running_var = module.running_mean, module.running_var
                converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
            return converted
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


# devices whose tensors torch's SyncBatchNorm synchronises (it refuses CPU tensors)
SYNC_BATCH_NORM_DEVICES = ("cuda", "xpu", "hpu")


def synchronize_batch_norms(student: nn.Module, teacher: nn.Module, num_processes: int,
                            device_type: str) -> tuple[nn.Module, nn.Module]:
    """With several processes, batch statistics over the global batch for every batch norm of student
    and teacher (ResNet backbones, `use_bn_in_head`), as the reference's SyncBatchNorm: the same run
    on N processes as on one, and teacher replicas whose running statistics stay identical. torch's
    `nn.SyncBatchNorm` on GPUs, `ProcessGroupBatchNorm` elsewhere (CPU processes). A no-op for one
    process or a model without batch norm."""
    has_batch_norms = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in student.modules())
    if num_processes == 1 or not has_batch_norms:
        return student, teacher
    convert = (nn.SyncBatchNorm.convert_sync_batchnorm if device_type in SYNC_BATCH_NORM_DEVICES
               else ProcessGroupBatchNorm.convert)
    return convert(student), convert(teacher)


# ---------------------------------------------------------------------- agreeing on batches
def agreement_process_group():
    """A gloo group over all processes for the small host-side agreements of the training loop
    (which batches to train on, images per process): the default group when it is gloo already,
    a new one otherwise (NCCL would need device tensors and a device synchronisation per step).
    Collective: every process must call it."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def agreed_batches(batches: Iterable[dict], num_processes: int = 1, group=None) -> Iterator[tuple[dict, bool]]:
    """(batch, trainable) for each batch of `batches` ({"crops": list of V tensors, possibly
    empty}) while every process still has one.

    With several processes, one all-reduce of two flags per batch (on `group`, a CPU gloo group:
    no device synchronisation) makes every process take the same decision: the epoch ends as soon
    as one process's data is exhausted (streamed shards of different lengths), and a batch is
    trained on only if every process has at least one decodable image in it; otherwise every
    process skips it alike, so no collective waits for a process that left the step.
    Collective: every process must iterate it in step with the others.
    """
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        has_batch = batch is not None
        has_images = has_batch and len(batch["crops"]) > 0
        if num_processes > 1:
            flags = torch.tensor([int(has_batch), int(has_images)], dtype=torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
            has_batch, has_images = bool(flags[0]), bool(flags[1])
        if not has_batch:
            return
        yield batch, has_images


def gather_counts(count: int, num_processes: int, group=None) -> list[int]:
    """[count of process 0, count of process 1, ...] on every process (collective with several)."""
    counts = torch.tensor([count], dtype=torch.long)
    if num_processes == 1:
        return counts.tolist()
    gathered = [torch.zeros_like(counts) for _ in range(num_processes)]
    dist.all_gather(gathered, counts, group=group)
    return torch.cat(gathered).tolist()


# ---------------------------------------------------------------------- engines
def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def configure_deepspeed_batch(accelerator, batch_size_per_device: int, gradient_accumulation_steps: int) -> None:
    """DeepSpeed needs its micro-batch before the model is prepared (the DataLoader is prepared
    separately), and its gradient accumulation must be the recipe's."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = batch_size_per_device
    # derived from the above (Accelerate may have filled in a value without the process count)
    config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"] * accelerator.num_processes
                                  * gradient_accumulation_steps)
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", gradient_accumulation_steps):
        raise ValueError(f"The DeepSpeed config's gradient_accumulation_steps ({accumulation}) differs from "
                         f"the recipe's ({gradient_accumulation_steps}); set both to the same value")


def freeze_last_layer_under_deepspeed(head: nn.Module, is_frozen: Callable[[], bool]) -> None:
    """DeepSpeed reduces gradients into its own buffers during backward, so they cannot be dropped
    afterwards: zero the head's last-layer gradients as they are produced while `is_frozen()` (so
    that Adam's moments stay zero); the step sets its lr to 0 meanwhile (so that weight decay
    cannot move it)."""
    for parameter in head.last_layer.parameters():
        if parameter.requires_grad:
            parameter.register_hook(lambda grad: torch.zeros_like(grad) if is_frozen() else grad)


def prepare_teacher(accelerator, teacher: nn.Module, clip_grad: float) -> nn.Module:
    """Place the teacher for the engine in use. It never gets an optimizer or gradients.

    - single process / DDP / DeepSpeed ZeRO-1,2: a full replica on every process (the student's
      parameters are whole there too, so the EMA is a plain element-wise update);
    - FSDP2: sharded exactly like the student, so that the EMA runs on local shards without any
      communication (see `optimization.ema_update`); its forward all-gathers like the student's
      and reshards after every forward (`reshard_after_every_forward`);
    - ZeRO-3 partitions parameters inside DeepSpeed's flat buffers, where a per-parameter EMA
      would need a gather every step: refused, use FSDP for parameter sharding.
    """
    if is_deepspeed(accelerator):
        plugin = accelerator.state.deepspeed_plugin
        if plugin.zero_stage == 3:
            raise ValueError("DeepSpeed ZeRO-3 is not supported (the EMA teacher needs per-parameter "
                             "access); use configs/accelerate/deepspeed_zero2.yaml or fsdp_full_shard.yaml")
        if clip_grad > 0:
            # DeepSpeed owns the gradients (flat, partitioned buffers): per-parameter clipping cannot
            # run, DeepSpeed's own global-norm clipping (`gradient_clipping` in its config) does.
            logger.warning("DeepSpeed: per-parameter clipping is replaced by DeepSpeed's global-norm "
                           "`gradient_clipping` (%s in its config)", plugin.deepspeed_config.get("gradient_clipping"))
        return teacher
    if is_fsdp(accelerator):
        if not accelerator.is_fsdp2:
            raise ValueError("hf_dino needs FSDP version 2 (`fsdp_version: 2` in the accelerate config): "
                             "the shard-wise EMA works on per-parameter shards")
        # `prepare_model` refuses FSDP2 (it wants an optimizer); the student's own preparation function
        # shards the teacher with the same auto-wrap policy and mesh, hence the same shard layout
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        teacher = fsdp2_prepare_model(accelerator, teacher)
        reshard_after_every_forward(teacher)
        return teacher
    return teacher


def reshard_after_every_forward(model: nn.Module) -> None:
    """Make every FSDP2 module of `model` free its all-gathered parameters after each forward.

    FSDP2 keeps the root module's parameters unsharded after the forward (torch's heuristic: the
    backward would gather them again at once). A teacher has no backward: its root stayed
    unsharded, so every later forward used the parameters of the first one, while the EMA updated
    the shards (the 1-4% drift of an FSDP2 run; docs/SCALING.md has a minimal reproduction).
    Resharding after each forward makes the next forward gather the updated shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.register_forward_hook(lambda fsdp_module, *_: fsdp_module.reshard())


def exportable_teacher(accelerator, teacher: nn.Module, on_every_process: bool = False) -> nn.Module:
    """A plain, unsharded copy of a sharded (FSDP2) teacher, on the main process, or on every process
    with `on_every_process` (for a sharded evaluation); the teacher itself when it is not sharded.
    Collective under FSDP: every process must call it."""
    if not is_fsdp(accelerator):
        return teacher
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full_state_dict + cpu_offload: only rank 0 receives the tensors; without offload, every rank
    options = StateDictOptions(full_state_dict=True, cpu_offload=not on_every_process)
    state = get_model_state_dict(teacher, options=options)
    unwrapped = accelerator.unwrap_model(teacher)
    plain = type(unwrapped)(unwrapped.config)
    if on_every_process or accelerator.is_main_process:
        plain.load_state_dict(state)
    return plain.to(accelerator.device)


def align_teacher_buffers(accelerator, teacher: nn.Module) -> None:
    """Take process 0's buffers (batch-norm running statistics) on every process before the teacher
    is evaluated and saved, so that every process holds the saved model. A no-op for one process
    and under FSDP (its buffers are replicated by the engine)."""
    if accelerator.num_processes == 1 or is_fsdp(accelerator):
        return
    for buffer in teacher.buffers():
        if buffer.is_floating_point() or buffer.dtype == torch.long:
            dist.broadcast(buffer.data, src=0)
