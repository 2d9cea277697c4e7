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
Its rooms: the data in `training_data`, the student and teacher in
`student_teacher`, the process group and the engines in `distributed`, the checkpoint files in
`checkpointing`, the CPU settings in `cpu_runtime`.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

from . import checkpointing, distributed
from .cpu_runtime import configure_cpu_training
from .data import MultiCropDataset, StreamingMultiCropDataset
from .evaluation.knn import held_out_knn
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
from .schedules import StepSchedule, step_schedule
from .student_teacher import build_student_and_teacher
from .training_data import build_training_data
from .training_metrics import DataCounts, MetricsWindow

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops and the last checkpoint stays intact."""


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
            **distributed.cpu_process_group_arguments(),
        )
        if self.accelerator.device.type == "cpu":
            local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.accelerator.num_processes))
            configure_cpu_training(recipe.num_threads, local_processes, self.accelerator.mixed_precision,
                                   recipe.keep_freed_cpu_memory)
        self.counts = DataCounts(self.accelerator.num_processes)
        self._agreement_group = None  # gloo group for the per-batch agreement (set by set_up())
        self.student: DinoModel | None = None  # set by train(): unwrapped student and teacher
        self.teacher: DinoModel | None = None
        self.pusher = None  # main process with --push_to_hub: uploads in the background
        if recipe.push_to_hub and self.accelerator.is_main_process:
            from .hub import HubPusher

            self.pusher = HubPusher(recipe.hub_model_id, recipe.hub_private_repo)

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
                self.counts.count_skipped(batch)
                if not trainable:  # some process has no decodable image in its batch: all skip it
                    self.counts.skipped_batches += 1
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
                    self._save_checkpoint(run, epoch)
                if run.global_step >= run.total_steps:
                    break
            self.counts.end_epoch(epoch, images_here, run.global_step - epoch_first_step, run.steps_per_epoch,
                                  log=accelerator.is_main_process)
        progress.close()
        return self.finish(run, last_metrics, time.perf_counter() - start_time)

    def set_up(self) -> TrainingRun:
        """Data, student and teacher, loss, optimizer, Accelerate's preparation, the step arithmetic,
        and the position to start from (a resumed checkpoint's, or the beginning)."""
        recipe, accelerator = self.recipe, self.accelerator
        set_seed(recipe.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        distributed.warn_if_launched_as_one_process()
        distributed.warn_fsdp_on_cpu(accelerator)
        data = build_training_data(recipe, accelerator)

        attention = training_attention_implementation(recipe.attn_implementation, accelerator.device.type,
                                                      accelerator.mixed_precision)
        student, teacher = build_student_and_teacher(recipe, attention)
        student, teacher = distributed.synchronize_batch_norms(student, teacher, accelerator.num_processes,
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
            distributed.configure_deepspeed_batch(accelerator, recipe.batch_size_per_device,
                                                  recipe.gradient_accumulation_steps)
        student, optimizer = accelerator.prepare(student, optimizer)
        teacher = distributed.prepare_teacher(accelerator, teacher, recipe.clip_grad)
        unwrapped_student = accelerator.unwrap_model(student)
        self.student, self.teacher = unwrapped_student, teacher
        student_parameters = list(unwrapped_student.parameters())
        self._last_layer_frozen = False
        if self._deepspeed and recipe.freeze_last_layer:
            distributed.freeze_last_layer_under_deepspeed(unwrapped_student.head, lambda: self._last_layer_frozen)
        if accelerator.num_processes > 1:
            self._agreement_group = self.counts.group = distributed.agreement_process_group()

        global_batch = recipe.batch_size_per_device * accelerator.num_processes * recipe.gradient_accumulation_steps
        if recipe.koleo_loss_weight > 0 and recipe.batch_size_per_device * accelerator.num_processes < 2:
            raise ValueError("koleo_loss_weight > 0 needs at least 2 images per step over all processes (each "
                             "feature's nearest neighbour is another image); raise --batch_size_per_device")
        steps_per_epoch = data.batches_per_epoch // recipe.gradient_accumulation_steps
        total_steps = recipe.max_steps or recipe.epochs * steps_per_epoch
        run = TrainingRun(
            student=student, teacher=teacher, optimizer=optimizer, dino_loss=dino_loss, koleo_loss=KoLeoLoss(),
            # compiled forwards for the step; everything else (EMA, clipping, saving) uses the modules
            student_forward=torch.compile(student) if recipe.torch_compile else student,
            teacher_forward=torch.compile(teacher) if recipe.torch_compile else teacher,
            student_parameters=student_parameters, teacher_parameters=list(teacher.parameters()),
            trainable_parameters=[p for p in student_parameters if p.requires_grad],
            dataset_dict=data.dataset_dict, train_dataset=data.train_dataset, dataloader=data.dataloader,
            global_batch=global_batch, base_lr=recipe.lr * global_batch / 256.0,  # linear scaling rule
            steps_per_epoch=steps_per_epoch,
            batches_per_epoch=steps_per_epoch * recipe.gradient_accumulation_steps,  # whole steps only
            total_steps=total_steps, num_epochs=math.ceil(total_steps / steps_per_epoch))
        if recipe.resume_from_checkpoint:
            self._load_checkpoint(run)
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
        if run.batches_done and not self.recipe.streaming:  # resuming mid-epoch: the same order, without the
            # batches already seen (a stream's DataLoader continues from its saved position by itself)
            batches = self.accelerator.skip_first_batches(run.dataloader, run.batches_done)
        batches = itertools.islice(batches, run.batches_per_epoch - run.batches_done)
        return distributed.agreed_batches(batches, self.accelerator.num_processes, self._agreement_group)

    def schedule(self, run: TrainingRun, epoch: int) -> StepSchedule:
        """This step's lr, weight decay, teacher momentum and temperature (`schedules.step_schedule`)."""
        return step_schedule(self.recipe, run.global_step, epoch, run.total_steps, run.steps_per_epoch, run.base_lr)

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
            if recipe.koleo_loss_weight > 0:  # each global crop's features separately, as DINOv2, over the global
                # batch (every process's images, both crops in one gather): the run does not depend on the process count
                per_image = student_output.features[:teacher_logits.shape[0]].unflatten(0, (2, -1)).transpose(0, 1)
                global_crops = distributed.gather_rows_with_gradients(per_image).transpose(0, 1)  # (2, N, D)
                output.koleo_loss = torch.stack([run.koleo_loss(features) for features in global_crops]).mean()
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
                   "num_skipped_images": self.counts.total_skipped_images(),
                   "num_skipped_batches": self.counts.skipped_batches,
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
        results = {"train": last_metrics, "train_time_s": train_time_s, "global_step": run.global_step,
                   **self.counts.state()}
        accelerator.wait_for_everyone()
        distributed.align_teacher_buffers(accelerator, run.teacher)
        teacher = distributed.exportable_teacher(accelerator, run.teacher, on_every_process=recipe.knn_eval_at_end)
        if recipe.knn_eval_at_end:  # every process extracts a shard of the features
            results["knn"] = self.evaluate_knn(teacher, run.dataset_dict)
        if accelerator.is_main_process:
            checkpointing.save_final_outputs(self.output_dir, teacher, results, self.recipe, self.pusher)
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
    @property
    def _deepspeed(self) -> bool:
        return distributed.is_deepspeed(self.accelerator)

    # ------------------------------------------------------------------ helpers
    def _check_finite(self, loss: float, first_step: int, last_step: int) -> None:
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"The loss became {loss} between steps {first_step} and {last_step}. Lower --lr, raise "
                f"--warmup_epochs or use --clip_grad; resume from the last checkpoint in {self.output_dir} "
                "(none was written after the loss diverged).")

    def _log(self, metrics: dict) -> None:
        self.accelerator.log(metrics, step=metrics["step"])
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(metrics) + "\n")

    def _save_checkpoint(self, run: TrainingRun, epoch: int) -> Path:
        """`checkpointing.save_checkpoint` of this run at its current step (collective)."""
        state = {"global_step": run.global_step, "epoch": epoch, "batches_in_epoch": run.batches_done,
                 **self.counts.state()}
        teacher = distributed.exportable_teacher(self.accelerator, run.teacher)
        # a streamed run also saves where each of this process's DataLoader workers is in its stream
        stream = {"num_workers": self.recipe.num_workers, "dataloader": run.dataloader.state_dict()} \
            if self.recipe.streaming else None
        return checkpointing.save_checkpoint(self.accelerator, self.output_dir, run.global_step, teacher,
                                             run.dino_loss, state, self.recipe, self.pusher, process_state=stream)

    def _load_checkpoint(self, run: TrainingRun) -> None:
        """Restore `recipe.resume_from_checkpoint` into `run`: models, optimizer, centre, counters and
        the position in the epoch to continue from."""
        path = checkpointing.resolve_checkpoint(self.recipe.resume_from_checkpoint, self.output_dir)
        if path is None:
            return
        state = checkpointing.load_checkpoint(self.accelerator, path, run.teacher, run.dino_loss,
                                              teacher_is_sharded=distributed.is_fsdp(self.accelerator))
        self.counts.load_state(state)
        run.global_step = state["global_step"]
        run.start_epoch = state.get("epoch", run.global_step // run.steps_per_epoch)
        # checkpoints without `batches_in_epoch` come from runs where every epoch had all its steps
        run.batches_to_skip = state.get("batches_in_epoch", (run.global_step - run.start_epoch * run.steps_per_epoch)
                                        * self.recipe.gradient_accumulation_steps)
        if run.batches_to_skip >= run.batches_per_epoch:  # the checkpoint closed its epoch
            run.start_epoch, run.batches_to_skip = run.start_epoch + 1, 0
        stream = checkpointing.load_process_state(path, self.accelerator.process_index, self.accelerator.num_processes)
        if self.recipe.streaming and run.batches_to_skip:  # continue each worker's stream where it stopped
            if stream is None or stream["num_workers"] != self.recipe.num_workers:
                raise ValueError(f"{path} holds no stream position for --num_workers {self.recipe.num_workers}; "
                                 "resume a streamed run with the --num_workers it was checkpointed with")
            run.dataloader.load_state_dict(stream["dataloader"])
        logger.info("Resuming at step %d (epoch %d, %d batches of it done)", run.global_step, run.start_epoch,
                    run.batches_to_skip)

    def _online_knn(self, teacher: DinoModel, dataset_dict) -> dict:
        """k-NN of the teacher during training, every process extracting a shard of the features:
        {"knn_top1", "knn_top5"} or {}."""
        teacher = distributed.exportable_teacher(self.accelerator, teacher, on_every_process=True)
        was_training = teacher.training
        knn = self.evaluate_knn(teacher, dataset_dict)
        teacher.train(was_training)
        return {} if knn is None else {"knn_top1": knn["top1"], "knn_top5": knn["top5"]}

    def evaluate_knn(self, teacher: DinoModel, dataset_dict) -> dict | None:
        """Weighted k-NN of the teacher backbone: train split as memory bank, held-out split as queries
        (`evaluation.held_out_knn`; every process extracts a shard of the features); printed."""
        recipe, accelerator = self.recipe, self.accelerator
        knn = held_out_knn(teacher, dataset_dict, train_split=recipe.train_split, val_split=recipe.val_split,
                           label_column=recipe.label_column, crop_size=recipe.evaluation_image_size,
                           ks=(recipe.knn_k,), temperature=recipe.knn_temperature, image_column=recipe.image_column,
                           num_workers=recipe.num_workers, device=accelerator.device,
                           max_train_samples=recipe.knn_max_train_samples,
                           accelerator=accelerator)
        if knn is not None and accelerator.is_main_process:
            print(f"k-NN (k={recipe.knn_k}, T={recipe.knn_temperature}) of the teacher on {knn['num_val']} held-out "
                  f"images: top-1 {knn['top1']:.2f}%, top-5 {knn['top5']:.2f}%")
        return knn
