"""The DINO training loop on 🤗 Accelerate, readable top to bottom.

One optimizer step:
  1. teacher(global crops) and student(all crops), under autocast when mixed precision is on;
  2. DINO loss in fp32, backward (gradients synchronised across processes by Accelerate);
  3. per-parameter gradient clipping, last head layer's gradients dropped in the first epoch(s);
  4. AdamW step with this step's lr and weight decay;
  5. EMA of the student into the teacher, and of the teacher outputs into the loss centre.
The teacher is never wrapped for gradient synchronisation: every process holds the same
copy and applies the same EMA update from the (synchronised) student.

`DinoTrainer.train` is the loop over epochs and batches; its parts are named methods:
`set_up` (data, models, optimizer, resume), `epoch_batches`, `schedule`, `training_step`
(the step above), `step_metrics` (logging), `evaluation_due` / `_online_knn`,
`checkpoint_due` / `_save_checkpoint`, and `finish` (final k-NN, saved teacher).
Model construction (`build_student_and_teacher`) lives next to the model, in `student_teacher`.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import (
    FALLBACK_VAL_SPLITS,
    MultiCropDataset,
    StreamingMultiCropDataset,
    collate_multicrop,
    load_dataset_dict,
    select_split,
    streamed_split_length,
)
from .evaluation import knn_evaluate_splits
from .loss import DinoLoss, DinoLossOutput, KoLeoLoss
from .modeling_dino import DinoModel, training_attention_implementation
from .optimization import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    ema_update,
    set_step_hyperparameters,
)
from .recipe import DinoRecipe
from .schedules import cosine_schedule, teacher_temperature_schedule
from .student_teacher import (  # noqa: F401  (build_dino_config, pretrained_backbone_config: re-exported, their home was here)
    build_dino_config,
    build_student_and_teacher,
    pretrained_backbone_config,
)
from .transforms import MultiCropAugmentation

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TEACHER_FILE = "teacher.safetensors"
LOSS_STATE_FILE = "dino_loss.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A training step frees and re-allocates the same large tensors every step (activations; at
    K = 65,536 the head's K x 256 weight, its bf16 copy and its gradient, 16-64 MB each). glibc
    serves blocks above its mmap threshold (32 MB at most) with fresh mappings and trims the free
    top of its heap, so the next step page-faults all of them in again: ~150,000 page faults and
    0.2-1 s of kernel time per ViT-S/16 step on a 2-core CPU (docs/BENCHMARKS.md). With mmap and
    trimming off (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, INT_MAX)`) the memory one
    step frees serves the next; the process's footprint stays at its peak. Affects the whole
    process from now on. Returns False (and changes nothing) where the C library is not glibc.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))


def cpu_has_bf16_matmuls() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without either, oneDNN
    emulates bf16: on the AVX2-only AMD EPYC this project was built on, a bf16 matmul ran ~500x
    slower than fp32 (docs/BENCHMARKS.md)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_process_group_arguments() -> dict:
    """`Accelerator` arguments for several processes on a machine without a GPU (CI, tests).

    Plain data parallelism (torchrun, or `accelerate launch --multi_gpu` there): Accelerate forms
    a gloo group only when told to use the CPU (`cpu=True`). A DeepSpeed launch must keep its
    engine, which `cpu=True` would replace by plain data parallelism: it gets the gloo backend
    instead (without any, Accelerate would count a single process). Accelerate runs FSDP on GPUs
    only: an FSDP launch on CPUs falls back to plain data parallelism. {} with a GPU or one process.
    """
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops and the last checkpoint stays intact."""


# devices whose tensors torch's SyncBatchNorm synchronises (it refuses CPU tensors)
SYNC_BATCH_NORM_DEVICES = ("cuda", "xpu", "hpu")


def synchronize_batch_norms(student: nn.Module, teacher: nn.Module, num_processes: int,
                            device_type: str) -> tuple[nn.Module, nn.Module]:
    """With several processes, turn every BatchNorm of student and teacher (ResNet backbones,
    `use_bn_in_head`) into a SyncBatchNorm, as the reference does: batch statistics over the
    global batch, and teacher replicas whose running statistics stay identical. A no-op for one
    process or a model without batch norm. torch's SyncBatchNorm runs only on GPU-like devices:
    on several CPU processes each keeps per-process statistics (a warning says so)."""
    has_batch_norms = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in student.modules())
    if num_processes == 1 or not has_batch_norms:
        return student, teacher
    if device_type not in SYNC_BATCH_NORM_DEVICES:
        logger.warning("Batch norms stay per-process on %s: torch's SyncBatchNorm needs a GPU", device_type)
        return student, teacher
    convert = nn.SyncBatchNorm.convert_sync_batchnorm
    return convert(student), convert(teacher)


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


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete `checkpoint-STEP` folder, as transformers' `get_last_checkpoint` finds it
    (the `checkpoint-STEP.tmp` folder of an interrupted write does not match its pattern)."""
    from transformers.trainer_utils import get_last_checkpoint

    if not Path(output_dir).is_dir():
        return None
    latest = get_last_checkpoint(str(output_dir))
    return Path(latest) if latest else None


@dataclass
class StepSchedule:
    """The schedule values of one optimizer step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


@dataclass(eq=False)
class TrainingRun:
    """What `DinoTrainer.set_up` builds and the training loop advances."""

    student: nn.Module  # as prepared by Accelerate (DDP, DeepSpeed or FSDP wrapper, or the model)
    teacher: DinoModel  # never wrapped for gradient synchronisation (FSDP2: sharded like the student)
    optimizer: torch.optim.Optimizer
    dino_loss: DinoLoss  # holds the centre
    koleo_loss: KoLeoLoss
    student_forward: Callable  # the student, or its torch.compile'd forward
    teacher_forward: Callable
    student_parameters: list[nn.Parameter]  # of the unwrapped student, in the teacher's order
    teacher_parameters: list[nn.Parameter]
    trainable_parameters: list[nn.Parameter]  # the student's with requires_grad (clipped)
    dataset_dict: Any  # every split (the held-out one serves the k-NN evaluations)
    train_dataset: MultiCropDataset | StreamingMultiCropDataset
    dataloader: Iterable[dict]
    global_batch: int  # images per optimizer step, all processes and accumulated batches together
    base_lr: float  # recipe.lr * global_batch / 256
    steps_per_epoch: int
    batches_per_epoch: int  # per process: steps_per_epoch * gradient_accumulation_steps
    total_steps: int
    num_epochs: int
    global_step: int = 0  # optimizer steps done
    start_epoch: int = 0
    batches_to_skip: int = 0  # of start_epoch, consumed before a resumed checkpoint was written
    batches_done: int = 0  # of the current epoch, skipped ones included


class MetricsWindow:
    """Sums of the loss statistics over the optimizer steps since the last log line, kept as device
    tensors so that a step never waits for the host; `means` averages them over steps and processes."""

    NAMES = ("loss", "teacher_entropy", "kl_student_teacher")

    def __init__(self, device: torch.device, with_koleo_loss: bool = False):
        self.names = self.NAMES + (("koleo_loss",) if with_koleo_loss else ())
        self.sums = {name: torch.zeros((), device=device) for name in self.names}
        self.reset()

    def reset(self) -> None:
        for value in self.sums.values():
            value.zero_()
        self.steps, self.images, self.start_time = 0, 0, time.perf_counter()

    def add(self, output: DinoLossOutput, images: int, gradient_accumulation_steps: int) -> None:
        """One batch's loss statistics, each weighted 1 / gradient_accumulation_steps (a step's value is
        the mean over its batches); `images`: trained on by all processes together."""
        self.sums["loss"] += output.loss.detach() / gradient_accumulation_steps
        self.sums["teacher_entropy"] += output.teacher_entropy / gradient_accumulation_steps
        self.sums["kl_student_teacher"] += output.kl_student_teacher / gradient_accumulation_steps
        if "koleo_loss" in self.sums:
            self.sums["koleo_loss"] += output.koleo_loss.detach() / gradient_accumulation_steps
        self.images += images

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """{name: mean per step over the window, averaged over processes} (collective)."""
        values = accelerator.reduce(torch.stack(list(self.sums.values())), reduction="mean")
        return dict(zip(self.names, values.div(self.steps).tolist()))


class DinoTrainer:
    """Runs DINO pretraining as described by a `DinoRecipe`.

    `train()` returns the final metrics (including the teacher's k-NN accuracy when the data
    has a labelled held-out split) and writes `output_dir/{teacher_backbone,dino}/`.
    """

    def __init__(self, recipe: DinoRecipe, accelerator: Accelerator | None = None):
        recipe.validate()
        self.recipe = recipe
        self.output_dir = Path(recipe.output_dir)
        # mixed_precision None: whatever `accelerate launch --mixed_precision` / `accelerate config` says
        precision = {} if recipe.mixed_precision is None else {"mixed_precision": recipe.mixed_precision}
        self.accelerator = accelerator or Accelerator(
            **precision,
            gradient_accumulation_steps=recipe.gradient_accumulation_steps,
            log_with=recipe.report_to_list() or None,
            project_dir=str(self.output_dir),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            **cpu_process_group_arguments(),
        )
        if self.accelerator.device.type == "cpu":
            # `accelerate launch` exports OMP_NUM_THREADS=1 unless told otherwise, which halves a
            # 2-core demo's speed; share the cores among the local processes instead.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", self.accelerator.num_processes)))
            torch.set_num_threads(recipe.num_threads or max(1, cores // local_processes))
            if self.accelerator.mixed_precision == "bf16" and not cpu_has_bf16_matmuls():
                logger.warning("mixed_precision bf16 on a CPU without bf16 matmul hardware (AVX512-BF16 or AMX): "
                               "bf16 is emulated here and can be far slower than fp32; use --mixed_precision no")
            if recipe.keep_freed_cpu_memory and keep_freed_cpu_memory():
                logger.info("glibc malloc keeps freed memory for reuse (keep_freed_cpu_memory)")
        self.num_skipped_images = 0  # undecodable images, all processes together
        self._skipped_images_here = 0  # ... found by this process since the last log
        self.num_skipped_batches = 0  # steps skipped on every process: some process had no decodable image
        self.images_per_process: list[int] = [0] * self.accelerator.num_processes  # images trained on
        self._agreement_group = None  # gloo group for the per-batch agreement (set by train())
        self.student: DinoModel | None = None  # set by train(): unwrapped student and teacher
        self.teacher: DinoModel | None = None
        self.pusher = None  # main process with --push_to_hub: uploads in the background
        if recipe.push_to_hub and self.accelerator.is_main_process:
            from .hub import HubPusher

            self.pusher = HubPusher(recipe.hub_model_id, recipe.hub_private_repo)

    # ------------------------------------------------------------------ set-up
    def _build_data(self):
        """Returns (all splits, training dataset, DataLoader, batches per epoch per process)."""
        recipe, accelerator = self.recipe, self.accelerator
        dataset_dict = load_dataset_dict(recipe.dataset_name, streaming=recipe.streaming,
                                         config_name=recipe.dataset_config_name)
        train_split = select_split(dataset_dict, recipe.train_split)
        augmentation = MultiCropAugmentation(
            global_crop_size=recipe.global_crop_size, local_crop_size=recipe.local_crop_size,
            global_crops_scale=recipe.global_crops_scale, local_crops_scale=recipe.local_crops_scale,
            local_crops_number=recipe.local_crops_number, params=recipe.augmentation_params())
        loader_kwargs = dict(batch_size=recipe.batch_size_per_device, drop_last=True, num_workers=recipe.num_workers,
                             collate_fn=collate_multicrop, pin_memory=accelerator.device.type == "cuda",
                             # Workers live for the whole run; the epoch reaches them through shared memory.
                             persistent_workers=recipe.num_workers > 0,
                             prefetch_factor=4 if recipe.num_workers > 0 else None)
        if recipe.streaming:
            num_examples = streamed_split_length(train_split)
            if recipe.max_train_samples is not None:
                train_split = train_split.take(recipe.max_train_samples)
                num_examples = min(num_examples or recipe.max_train_samples, recipe.max_train_samples)
            if num_examples is None:
                raise ValueError("The streamed split does not declare its length, so an epoch is undefined: "
                                 "pass --max_train_samples N (one epoch = N images).")
            train_dataset = StreamingMultiCropDataset(
                train_split, augmentation, recipe.image_column, seed=recipe.seed,
                shuffle_buffer_size=recipe.shuffle_buffer_size,
                rank=accelerator.process_index, world_size=accelerator.num_processes)
            # Not prepared by Accelerate: the stream is already split across processes.
            dataloader = torch.utils.data.DataLoader(train_dataset, **loader_kwargs)
            batches_per_epoch = num_examples // accelerator.num_processes // recipe.batch_size_per_device
        else:
            if recipe.max_train_samples is not None:
                train_split = train_split.select(range(min(recipe.max_train_samples, len(train_split))))
            train_dataset = MultiCropDataset(train_split, augmentation, recipe.image_column, seed=recipe.seed)
            dataloader = torch.utils.data.DataLoader(train_dataset, shuffle=True,
                                                     generator=torch.Generator().manual_seed(recipe.seed),
                                                     **loader_kwargs)
            dataloader = accelerator.prepare(dataloader)
            batches_per_epoch = len(dataloader)
        if batches_per_epoch < recipe.gradient_accumulation_steps:
            raise ValueError(f"The training split holds fewer than {recipe.gradient_accumulation_steps} batches of "
                             f"{recipe.batch_size_per_device} per process; lower --batch_size_per_device or use more data.")
        return dataset_dict, train_dataset, dataloader, batches_per_epoch

    # ------------------------------------------------------------------ training
    def train(self) -> dict:
        """Pretrain as the recipe says; returns the final metrics (see the class docstring)."""
        recipe, accelerator = self.recipe, self.accelerator
        run = self.set_up()
        progress = tqdm(total=run.total_steps, initial=run.global_step, desc="DINO",
                        disable=not accelerator.is_local_main_process)
        window = MetricsWindow(accelerator.device, with_koleo_loss=recipe.koleo_loss_weight > 0)
        start_time = time.perf_counter()
        last_metrics: dict = {}
        run.student.train()
        run.teacher.train()  # as the reference: matters only for batch-norm heads / ResNet teachers

        for epoch in range(run.start_epoch, run.num_epochs):
            if run.global_step >= run.total_steps:
                break
            epoch_first_step, images_here = run.global_step, 0
            for batch, trainable in self.epoch_batches(run, epoch):
                run.batches_done += 1
                self._count_skipped(batch)
                if not trainable:  # some process has no decodable image in its batch: all skip it
                    self.num_skipped_batches += 1
                    continue
                crops = [crop.to(accelerator.device, non_blocking=True) for crop in batch["crops"]]
                images_here += crops[0].shape[0]
                schedule = self.schedule(run, epoch)
                output, stepped = self.training_step(run, crops, schedule, epoch)
                window.add(output, crops[0].shape[0] * accelerator.num_processes, recipe.gradient_accumulation_steps)
                if not stepped:  # gradients accumulate over the next batch
                    continue
                run.global_step += 1
                window.steps += 1
                progress.update(1)

                evaluate_now = self.evaluation_due(run)
                if evaluate_now or self.logging_due(run):
                    metrics = self.step_metrics(run, window, schedule, start_time)
                    if evaluate_now:
                        metrics.update(self._online_knn(run.teacher, run.dataset_dict))
                    self._log(metrics)
                    last_metrics = metrics
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.1f}")
                    window.reset()  # after any evaluation too, so that img_per_s stays a training rate
                if self.checkpoint_due(run):
                    if window.steps:  # steps since the last log: never checkpoint non-finite weights
                        self._check_finite(window.sums["loss"].item(), run.global_step - window.steps + 1,
                                           run.global_step)
                    self._save_checkpoint(run.global_step, epoch, run.batches_done, run.teacher, run.dino_loss)
                if run.global_step >= run.total_steps:
                    break
            self._end_epoch(epoch, images_here, run.global_step - epoch_first_step, run.steps_per_epoch)
        progress.close()
        return self.finish(run, last_metrics, time.perf_counter() - start_time)

    def set_up(self) -> TrainingRun:
        """Data, student and teacher, loss, optimizer, Accelerate's preparation, the step arithmetic,
        and the position to start from (a resumed checkpoint's, or the beginning)."""
        recipe, accelerator = self.recipe, self.accelerator
        set_seed(recipe.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        dataset_dict, train_dataset, dataloader, batches_per_epoch = self._build_data()

        attention = training_attention_implementation(recipe.attn_implementation, accelerator.device.type,
                                                      accelerator.mixed_precision)
        student, teacher = build_student_and_teacher(recipe, attention)
        student, teacher = synchronize_batch_norms(student, teacher, accelerator.num_processes,
                                                   accelerator.device.type)
        if recipe.gradient_checkpointing:  # activations of each block are recomputed in the backward pass
            getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
        teacher.to(accelerator.device)
        dino_loss = DinoLoss(recipe.out_dim, num_teacher_views=2, student_temperature=recipe.student_temp,
                             center_momentum=recipe.center_momentum,
                             centering=recipe.teacher_centering).to(accelerator.device)
        student.to(accelerator.device)
        optimizer = build_optimizer(student, recipe.optimizer, recipe.sgd_momentum)
        if self._deepspeed:
            self._configure_deepspeed_batch()
        student, optimizer = accelerator.prepare(student, optimizer)
        teacher = self._prepare_teacher(teacher)
        unwrapped_student = accelerator.unwrap_model(student)
        self.student, self.teacher = unwrapped_student, teacher
        student_parameters = list(unwrapped_student.parameters())
        self._last_layer_frozen = False
        if self._deepspeed and recipe.freeze_last_layer:
            # DeepSpeed reduces gradients into its own buffers during backward, so they cannot be
            # dropped afterwards: zero the last layer's gradients as they are produced (so that Adam's
            # moments stay zero), and its lr is 0 meanwhile (so that weight decay cannot move it).
            for parameter in unwrapped_student.head.last_layer.parameters():
                if parameter.requires_grad:
                    parameter.register_hook(lambda grad: torch.zeros_like(grad) if self._last_layer_frozen else grad)
        if accelerator.num_processes > 1:
            self._agreement_group = agreement_process_group()

        global_batch = recipe.batch_size_per_device * accelerator.num_processes * recipe.gradient_accumulation_steps
        steps_per_epoch = batches_per_epoch // recipe.gradient_accumulation_steps
        total_steps = recipe.max_steps or recipe.epochs * steps_per_epoch
        run = TrainingRun(
            student=student, teacher=teacher, optimizer=optimizer, dino_loss=dino_loss, koleo_loss=KoLeoLoss(),
            # compiled forwards for the step; everything else (EMA, clipping, saving) uses the modules
            student_forward=torch.compile(student) if recipe.torch_compile else student,
            teacher_forward=torch.compile(teacher) if recipe.torch_compile else teacher,
            student_parameters=student_parameters, teacher_parameters=list(teacher.parameters()),
            trainable_parameters=[p for p in student_parameters if p.requires_grad],
            dataset_dict=dataset_dict, train_dataset=train_dataset, dataloader=dataloader,
            global_batch=global_batch, base_lr=recipe.lr * global_batch / 256.0,  # linear scaling rule
            steps_per_epoch=steps_per_epoch,
            batches_per_epoch=steps_per_epoch * recipe.gradient_accumulation_steps,  # whole steps only
            total_steps=total_steps, num_epochs=math.ceil(total_steps / steps_per_epoch))
        if recipe.resume_from_checkpoint:
            run.global_step, run.start_epoch, run.batches_to_skip = self._load_checkpoint(
                recipe.resume_from_checkpoint, teacher, dino_loss, steps_per_epoch)
            if run.batches_to_skip >= run.batches_per_epoch:  # the checkpoint closed its epoch
                run.start_epoch, run.batches_to_skip = run.start_epoch + 1, 0
        if accelerator.is_main_process:
            (self.output_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
        accelerator.init_trackers("hf_dino", config={k: v for k, v in recipe.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})
        logger.info("DINO: global batch %d, %d steps/epoch, %d steps, base lr %.3g, mixed precision %s",
                    global_batch, steps_per_epoch, total_steps, run.base_lr, accelerator.mixed_precision)
        return run

    def epoch_batches(self, run: TrainingRun, epoch: int) -> Iterator[tuple[dict, bool]]:
        """(batch, trainable) for the batches of `epoch` still to train on: the epoch's shuffle, without
        the batches a resumed checkpoint had consumed, whole optimizer steps only, and the same
        decisions on every process (`agreed_batches`). Sets `run.batches_done` to the batches skipped."""
        run.train_dataset.set_epoch(epoch)
        if hasattr(run.dataloader, "set_epoch"):
            run.dataloader.set_epoch(epoch)
        run.batches_done = run.batches_to_skip if epoch == run.start_epoch else 0
        batches = run.dataloader
        if run.batches_done:  # resuming mid-epoch: the same order, without the batches already seen
            batches = (itertools.islice(run.dataloader, run.batches_done, None) if self.recipe.streaming
                       else self.accelerator.skip_first_batches(run.dataloader, run.batches_done))
        batches = itertools.islice(batches, run.batches_per_epoch - run.batches_done)
        return agreed_batches(batches, self.accelerator.num_processes, self._agreement_group)

    def schedule(self, run: TrainingRun, epoch: int) -> StepSchedule:
        """This step's lr (linear warm-up, then cosine), weight decay and teacher momentum (cosine),
        and teacher temperature (linear warm-up per epoch as the reference, or per step with
        `warmup_teacher_temp_steps`, then constant)."""
        recipe, step, total_steps = self.recipe, run.global_step, run.total_steps
        warmup_steps = recipe.warmup_epochs * run.steps_per_epoch if recipe.warmup_steps is None else recipe.warmup_steps
        if recipe.warmup_teacher_temp_steps is None:
            teacher_temp = teacher_temperature_schedule(epoch, recipe.warmup_teacher_temp, recipe.teacher_temp,
                                                        recipe.warmup_teacher_temp_epochs)
        else:
            teacher_temp = teacher_temperature_schedule(step, recipe.warmup_teacher_temp, recipe.teacher_temp,
                                                        recipe.warmup_teacher_temp_steps)
        return StepSchedule(
            lr=cosine_schedule(step, total_steps, run.base_lr, recipe.min_lr, warmup_steps),
            weight_decay=cosine_schedule(step, total_steps, recipe.weight_decay, recipe.weight_decay_end),
            momentum=cosine_schedule(step, total_steps, recipe.momentum_teacher, recipe.momentum_teacher_end),
            teacher_temp=teacher_temp,
        )

    def training_step(self, run: TrainingRun, crops: list[torch.Tensor], schedule: StepSchedule,
                      epoch: int) -> tuple[DinoLossOutput, bool]:
        """One batch: the teacher on the 2 global crops, the student on all V crops (each (B, 3, H, W)),
        the DINO loss, backward. Every `gradient_accumulation_steps`-th batch completes an optimizer
        step: per-parameter clipping, the last layer's gradients dropped during the first
        `freeze_last_layer` epochs, the optimizer step at `schedule`'s lr and weight decay, then the
        EMA of the student into the teacher and of the teacher outputs into the centre.
        Returns (the loss output, whether the optimizer stepped)."""
        recipe, accelerator = self.recipe, self.accelerator
        self._last_layer_frozen = epoch < recipe.freeze_last_layer
        # set before the backward pass: DeepSpeed steps its optimizer inside `accelerator.backward`
        set_step_hyperparameters(run.optimizer, schedule.lr, schedule.weight_decay, self._last_layer_frozen)
        with accelerator.accumulate(run.student):
            with torch.no_grad(), accelerator.autocast():
                teacher_logits = run.teacher_forward(crops[:2]).logits
            student_output = run.student_forward(crops)
            output = run.dino_loss(student_output.logits, teacher_logits, schedule.teacher_temp)
            total_loss = output.loss
            if recipe.koleo_loss_weight > 0:  # on each global crop's features separately, as DINOv2
                global_features = student_output.features[:teacher_logits.shape[0]].chunk(len(crops[:2]))
                output.koleo_loss = torch.stack([run.koleo_loss(features) for features in global_features]).mean()
                total_loss = total_loss + recipe.koleo_loss_weight * output.koleo_loss
            accelerator.backward(total_loss)
            run.dino_loss.accumulate_center(teacher_logits)
            if not accelerator.sync_gradients:
                return output, False
            if recipe.clip_grad > 0 and not self._deepspeed:
                accelerator.unscale_gradients()  # fp16: clip the true gradients, not the scaled ones
                clip_gradients_per_parameter(run.trainable_parameters, recipe.clip_grad)
            if self._last_layer_frozen and not self._deepspeed:
                cancel_last_layer_gradients(self.student.head)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        ema_update(run.teacher_parameters, run.student_parameters, schedule.momentum)
        run.dino_loss.update_center()
        return output, True

    # ------------------------------------------------------------------ logging, evaluation, checkpoints
    def logging_due(self, run: TrainingRun) -> bool:
        """Log every `logging_steps` steps and at the last step."""
        return run.global_step % self.recipe.logging_steps == 0 or run.global_step == run.total_steps

    def evaluation_due(self, run: TrainingRun) -> bool:
        """Online k-NN every `eval_every` steps, except at the last (the final evaluation follows it)."""
        eval_every = self.recipe.eval_every
        return bool(eval_every) and run.global_step % eval_every == 0 and run.global_step < run.total_steps

    def checkpoint_due(self, run: TrainingRun) -> bool:
        """A checkpoint every `checkpointing_steps` steps."""
        return bool(self.recipe.checkpointing_steps) and run.global_step % self.recipe.checkpointing_steps == 0

    def step_metrics(self, run: TrainingRun, window: MetricsWindow, schedule: StepSchedule, start_time: float) -> dict:
        """The log line of the steps since the last one: loss statistics averaged over those steps
        and over processes (collective), this step's schedule, throughput and skipped-data counts.
        Raises `NonFiniteLossError` when the loss is not finite."""
        elapsed = time.perf_counter() - window.start_time
        metrics = {"step": run.global_step, "epoch": round(run.global_step / run.steps_per_epoch, 4),
                   **window.means(self.accelerator), "lr": schedule.lr,
                   "weight_decay": schedule.weight_decay, "momentum": schedule.momentum,
                   "teacher_temp": schedule.teacher_temp, "img_per_s": window.images / elapsed,
                   "num_skipped_images": self._total_skipped_images(),
                   "num_skipped_batches": self.num_skipped_batches,
                   "elapsed_s": time.perf_counter() - start_time}
        self._check_finite(metrics["loss"], run.global_step - window.steps + 1, run.global_step)
        return metrics

    def finish(self, run: TrainingRun, last_metrics: dict, train_time_s: float) -> dict:
        """After the last step: the final k-NN evaluation and the saved teacher (`_save_final`);
        releases the prepared student and optimizer on every process. Returns the results."""
        recipe, accelerator = self.recipe, self.accelerator
        if run.global_step < run.total_steps:
            logger.warning("Training ended at step %d of %d: an epoch ran short (a stream shorter than "
                           "declared, or skipped batches); the schedules did not reach their end.",
                           run.global_step, run.total_steps)
        results = {"train": last_metrics, "train_time_s": train_time_s,
                   "global_step": run.global_step, "images_per_process": self.images_per_process,
                   "num_skipped_images": self._total_skipped_images(),
                   "num_skipped_batches": self.num_skipped_batches}
        accelerator.wait_for_everyone()
        self._align_teacher_buffers(run.teacher)
        teacher = self._exportable_teacher(run.teacher, on_every_process=recipe.knn_eval_at_end)
        if recipe.knn_eval_at_end:  # every process extracts a shard of the features
            results["knn"] = self.evaluate_knn(teacher, run.dataset_dict)
        if accelerator.is_main_process:
            self._save_final(teacher, results)
        # The DDP wrapper's reducer holds the process group. Free it on every rank while all ranks are
        # still alive (the barrier below waits for all): freed after a peer has exited, gloo's
        # destructor can hang.
        run.student = run.student_forward = run.optimizer = None
        accelerator.free_memory()
        gc.collect()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return results

    # ------------------------------------------------------------------ several processes
    def _end_epoch(self, epoch: int, images_here: int, steps: int, steps_per_epoch: int) -> None:
        """Count the images each process trained on in this epoch and log them."""
        counts = torch.tensor([images_here], dtype=torch.long)
        if self.accelerator.num_processes > 1:
            gathered = [torch.zeros_like(counts) for _ in range(self.accelerator.num_processes)]
            dist.all_gather(gathered, counts, group=self._agreement_group)
            counts = torch.cat(gathered)
        self.images_per_process = [total + int(count) for total, count in zip(self.images_per_process, counts)]
        if steps < steps_per_epoch:
            logger.warning("Epoch %d ran %d of %d steps (data exhausted on a process, or %d skipped batches so far)",
                           epoch, steps, steps_per_epoch, self.num_skipped_batches)
        if self.accelerator.is_main_process:
            logger.info("Epoch %d: %d steps; images trained on per process: %s", epoch, steps, counts.tolist())

    def _total_skipped_images(self) -> int:
        """Undecodable images met so far by all processes together (collective with several)."""
        if self.accelerator.num_processes > 1:
            here = torch.tensor([self._skipped_images_here], dtype=torch.long)
            dist.all_reduce(here, group=self._agreement_group)
            self._skipped_images_here = 0
            self.num_skipped_images += int(here)
        else:
            self.num_skipped_images += self._skipped_images_here
            self._skipped_images_here = 0
        return self.num_skipped_images

    def _configure_deepspeed_batch(self) -> None:
        """DeepSpeed needs its micro-batch before the model is prepared (the DataLoader is prepared
        separately), and its gradient accumulation must be the recipe's."""
        plugin = self.accelerator.state.deepspeed_plugin
        config = plugin.deepspeed_config
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            config["train_micro_batch_size_per_gpu"] = self.recipe.batch_size_per_device
        # derived from the above (Accelerate may have filled in a value without the process count)
        config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"] * self.accelerator.num_processes
                                      * self.recipe.gradient_accumulation_steps)
        accumulation = config.get("gradient_accumulation_steps", "auto")
        if accumulation not in ("auto", self.recipe.gradient_accumulation_steps):
            raise ValueError(f"The DeepSpeed config's gradient_accumulation_steps ({accumulation}) differs from "
                             f"the recipe's ({self.recipe.gradient_accumulation_steps}); set both to the same value")

    def _align_teacher_buffers(self, teacher: DinoModel) -> None:
        """Batch-norm running statistics of a teacher whose batch norms are not synchronised (several
        CPU processes) differ per process: take process 0's before evaluating and saving."""
        if self.accelerator.num_processes == 1 or self._fsdp:
            return
        for buffer in teacher.buffers():
            if buffer.is_floating_point() or buffer.dtype == torch.long:
                dist.broadcast(buffer.data, src=0)

    # ------------------------------------------------------------------ engines
    @property
    def _deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def _fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    def _prepare_teacher(self, teacher: DinoModel) -> DinoModel:
        """Place the teacher for the engine in use. It never gets an optimizer or gradients.

        - single process / DDP / DeepSpeed ZeRO-1,2: a full replica on every process (the student's
          parameters are whole there too, so the EMA is a plain element-wise update);
        - FSDP2: sharded exactly like the student, so that the EMA runs on local shards without any
          communication (see `optimization.ema_update`); its forward all-gathers like the student's;
        - ZeRO-3 partitions parameters inside DeepSpeed's flat buffers, where a per-parameter EMA
          would need a gather every step: refused, use FSDP for parameter sharding.
        """
        accelerator = self.accelerator
        if self._deepspeed:
            plugin = accelerator.state.deepspeed_plugin
            if plugin.zero_stage == 3:
                raise ValueError("DeepSpeed ZeRO-3 is not supported (the EMA teacher needs per-parameter "
                                 "access); use configs/accelerate/deepspeed_zero2.yaml or fsdp_full_shard.yaml")
            if self.recipe.clip_grad > 0:
                # DeepSpeed owns the gradients (flat, partitioned buffers): per-parameter clipping cannot
                # run, DeepSpeed's own global-norm clipping (`gradient_clipping` in its config) does.
                logger.warning("DeepSpeed: per-parameter clipping is replaced by DeepSpeed's global-norm "
                               "`gradient_clipping` (%s in its config)", plugin.deepspeed_config.get("gradient_clipping"))
            return teacher
        if self._fsdp:
            if not accelerator.is_fsdp2:
                raise ValueError("hf_dino needs FSDP version 2 (`fsdp_version: 2` in the accelerate config): "
                                 "the shard-wise EMA works on per-parameter shards")
            # `prepare_model` refuses FSDP2 (it wants an optimizer); the student's own preparation function
            # shards the teacher with the same auto-wrap policy and mesh, hence the same shard layout
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            return fsdp2_prepare_model(accelerator, teacher)
        return teacher

    def _exportable_teacher(self, teacher: DinoModel, on_every_process: bool = False) -> DinoModel:
        """A plain, unsharded `DinoModel` with the teacher's weights (collective under FSDP: every
        process must call it): on the main process, or on every process with `on_every_process`
        (for a sharded evaluation); the teacher itself when it is not sharded."""
        if not self._fsdp:
            return teacher
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # full_state_dict + cpu_offload: only rank 0 receives the tensors; without offload, every rank
        options = StateDictOptions(full_state_dict=True, cpu_offload=not on_every_process)
        state = get_model_state_dict(teacher, options=options)
        plain = DinoModel(self.accelerator.unwrap_model(teacher).config)
        if on_every_process or self.accelerator.is_main_process:
            plain.load_state_dict(state)
        return plain.to(self.accelerator.device)

    # ------------------------------------------------------------------ helpers
    def _check_finite(self, loss: float, first_step: int, last_step: int) -> None:
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"The loss became {loss} between steps {first_step} and {last_step}. Lower --lr, raise "
                f"--warmup_epochs or use --clip_grad; resume from the last checkpoint in {self.output_dir} "
                "(none was written after the loss diverged).")

    def _count_skipped(self, batch: dict) -> None:
        if batch["num_skipped"]:
            if self.num_skipped_images + self._skipped_images_here < 5:
                logger.warning("Skipped undecodable image(s) at dataset index %s", ", ".join(map(str, batch["skipped_indices"])))
            self._skipped_images_here += batch["num_skipped"]

    def _log(self, metrics: dict) -> None:
        self.accelerator.log(metrics, step=metrics["step"])
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(metrics) + "\n")

    def _save_checkpoint(self, step: int, epoch: int, batches_in_epoch: int, teacher: DinoModel,
                         dino_loss: DinoLoss) -> Path:
        """Write `checkpoint-STEP/` atomically: into `checkpoint-STEP.tmp`, then rename. It holds
        Accelerate's state (student, optimizer, RNG, data position), the teacher and the centre
        (safetensors), `trainer_state.json`, and `teacher_backbone/` (a transformers model folder).
        `batches_in_epoch`: batches of `epoch` consumed so far, skipped ones included."""
        accelerator = self.accelerator
        num_skipped_images = self._total_skipped_images()
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        temporary = self.output_dir / f"{CHECKPOINT_PREFIX}{step}.tmp"
        if accelerator.is_main_process and temporary.exists():
            shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary), safe_serialization=True)
        teacher = self._exportable_teacher(teacher)
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(temporary / TEACHER_FILE))
            save_file(dino_loss.state_dict(), str(temporary / LOSS_STATE_FILE))
            state = {"global_step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                     "num_skipped_images": num_skipped_images, "num_skipped_batches": self.num_skipped_batches,
                     "images_per_process": self.images_per_process}
            (temporary / TRAINER_STATE_FILE).write_text(json.dumps(state))
            # the teacher backbone as a transformers folder: AutoModel.from_pretrained loads it, and it
            # is pushed to the Hub as is
            from .hub import save_teacher_backbone

            save_teacher_backbone(teacher, temporary / "teacher_backbone", self.recipe, {"global_step": step})
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            if self.pusher is not None:
                self.pusher.push(final / "teacher_backbone", f"DINO teacher backbone, step {step}")
            self._rotate_checkpoints()
        accelerator.wait_for_everyone()
        return final

    def _rotate_checkpoints(self) -> None:
        limit = self.recipe.save_total_limit
        if not limit:
            return
        checkpoints = sorted((p for p in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*")
                              if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()),
                             key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
        for old in checkpoints[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _safetensors_device(self) -> str:
        """The device as safetensors names it ("cpu", not Accelerate's "cpu:0" of CPU processes)."""
        device = self.accelerator.device
        return "cpu" if device.type == "cpu" else str(device)

    def _load_checkpoint(self, checkpoint: str, teacher: DinoModel, dino_loss: DinoLoss,
                         steps_per_epoch: int) -> tuple[int, int, int]:
        """Restore a checkpoint; returns (global step, epoch, batches of that epoch already consumed)."""
        path = find_latest_checkpoint(self.output_dir) if checkpoint == "latest" else Path(checkpoint)
        if path is None:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch",
                           self.output_dir)
            return 0, 0, 0
        if not (path / TRAINER_STATE_FILE).exists():
            raise FileNotFoundError(f"{path} is not a complete hf_dino checkpoint (no {TRAINER_STATE_FILE}).")
        self.accelerator.load_state(str(path))  # under FSDP this restores the (prepared) teacher's shards too
        if not self._fsdp:
            teacher.load_state_dict(load_file(str(path / TEACHER_FILE), device=self._safetensors_device()))
        dino_loss.load_state_dict(load_file(str(path / LOSS_STATE_FILE), device=self._safetensors_device()))
        state = json.loads((path / TRAINER_STATE_FILE).read_text())
        self.num_skipped_images = state["num_skipped_images"]
        self.num_skipped_batches = state.get("num_skipped_batches", 0)
        if len(state.get("images_per_process", [])) == self.accelerator.num_processes:
            self.images_per_process = state["images_per_process"]
        step = state["global_step"]
        epoch = state.get("epoch", step // steps_per_epoch)
        # checkpoints without `batches_in_epoch` come from runs where every epoch had all its steps
        batches_in_epoch = state.get("batches_in_epoch",
                                     (step - epoch * steps_per_epoch) * self.recipe.gradient_accumulation_steps)
        logger.info("Resumed from %s at step %d", path, step)
        return step, epoch, batches_in_epoch

    def _online_knn(self, teacher: DinoModel, dataset_dict) -> dict:
        """k-NN of the teacher during training, every process extracting a shard of the features:
        {"knn_top1", "knn_top5"} or {}."""
        teacher = self._exportable_teacher(teacher, on_every_process=True)
        was_training = teacher.training
        knn = self.evaluate_knn(teacher, dataset_dict)
        teacher.train(was_training)
        return {} if knn is None else {"knn_top1": knn["top1"], "knn_top5": knn["top5"]}

    def evaluate_knn(self, teacher: DinoModel, dataset_dict) -> dict | None:
        """Weighted k-NN of the teacher backbone: train split as memory bank, held-out split as queries."""
        recipe = self.recipe
        try:
            val_split = select_split(dataset_dict, recipe.val_split, fallbacks=FALLBACK_VAL_SPLITS)
            train_split = select_split(dataset_dict, recipe.train_split)
        except KeyError as error:
            logger.warning("k-NN evaluation skipped: %s", error)
            return None
        if recipe.label_column not in (train_split.features or {}):
            logger.warning("k-NN evaluation skipped: no %r column", recipe.label_column)
            return None
        knn = knn_evaluate_splits(
            teacher, train_split, val_split, crop_size=recipe.evaluation_image_size, ks=(recipe.knn_k,),
            temperature=recipe.knn_temperature, image_column=recipe.image_column, label_column=recipe.label_column,
            num_workers=recipe.num_workers, device=self.accelerator.device,
            max_train_samples=recipe.knn_max_train_samples,
            accelerator=self.accelerator if self.accelerator.num_processes > 1 else None)
        knn["split"] = str(getattr(val_split, "split", None) or recipe.val_split)  # after the fallback
        if self.accelerator.is_main_process:
            print(f"k-NN (k={recipe.knn_k}, T={recipe.knn_temperature}) of the teacher on {knn['num_val']} held-out "
                  f"images: top-1 {knn['top1']:.2f}%, top-5 {knn['top5']:.2f}%")
        return knn

    def _save_final(self, teacher: DinoModel, results: dict) -> None:
        from .hub import save_teacher_backbone

        teacher.save_pretrained(self.output_dir / "dino")
        backbone_dir = save_teacher_backbone(teacher, self.output_dir / "teacher_backbone", self.recipe, results)
        if self.pusher is not None:
            self.pusher.push(backbone_dir, f"DINO teacher backbone, step {results['global_step']} (final)")
            results["push"] = self.pusher.wait()  # waits for the checkpoints' uploads too
        (self.output_dir / "results.json").write_text(json.dumps(results, indent=2))
