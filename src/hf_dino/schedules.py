"""Per-iteration schedules of the DINO recipe, in closed form (no precomputed arrays).

Each function maps an optimizer step (0-based) to a value, so resuming at step s needs only s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine_schedule(step: int, total_steps: int, base_value: float, final_value: float,
                    warmup_steps: int = 0, warmup_start_value: float = 0.0) -> float:
    """Linear warm-up from `warmup_start_value` to `base_value` over `warmup_steps`, then a
    half-cosine from `base_value` to `final_value` over the remaining steps.

    Matches the reference's `cosine_scheduler` array element-wise: during warm-up the value at
    step i is start + (base - start) * i / (warmup_steps - 1); afterwards, with
    j = step - warmup_steps and n = total_steps - warmup_steps,
    final + (base - final) * (1 + cos(pi * j / n)) / 2. Steps past the end keep the last value.
    """
    if step < warmup_steps:
        if warmup_steps == 1:
            return warmup_start_value
        return warmup_start_value + (base_value - warmup_start_value) * step / (warmup_steps - 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(step - warmup_steps, decay_steps - 1) / decay_steps
    return final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * progress))


def teacher_temperature_schedule(epoch: int, warmup_teacher_temp: float, teacher_temp: float,
                                 warmup_teacher_temp_epochs: int) -> float:
    """Teacher temperature of an epoch: linear from `warmup_teacher_temp` (epoch 0) to
    `teacher_temp` (epoch `warmup_teacher_temp_epochs - 1`), then constant (the reference's
    per-epoch `np.linspace` schedule). Given a step and a number of steps instead, the same
    warm-up runs per step (`warmup_teacher_temp_steps`)."""
    if epoch >= warmup_teacher_temp_epochs:
        return teacher_temp
    if warmup_teacher_temp_epochs == 1:
        return warmup_teacher_temp
    fraction = epoch / (warmup_teacher_temp_epochs - 1)
    return warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * fraction


@dataclass
class StepSchedule:
    """The schedule values of one optimizer step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


def step_schedule(recipe, step: int, epoch: int, total_steps: int, steps_per_epoch: int,
                  base_lr: float) -> StepSchedule:
    """A recipe's (`DinoRecipe`) values at optimizer step `step` of epoch `epoch`: lr (linear warm-up
    to `base_lr`, then cosine to `min_lr`), weight decay and teacher momentum (cosine), and teacher
    temperature (linear warm-up per epoch as the reference, or per step with
    `warmup_teacher_temp_steps`, then constant)."""
    warmup_steps = recipe.warmup_epochs * steps_per_epoch if recipe.warmup_steps is None else recipe.warmup_steps
    if recipe.warmup_teacher_temp_steps is None:
        teacher_temp = teacher_temperature_schedule(epoch, recipe.warmup_teacher_temp, recipe.teacher_temp,
                                                    recipe.warmup_teacher_temp_epochs)
    else:
        teacher_temp = teacher_temperature_schedule(step, recipe.warmup_teacher_temp, recipe.teacher_temp,
                                                    recipe.warmup_teacher_temp_steps)
    return StepSchedule(
        lr=cosine_schedule(step, total_steps, base_lr, recipe.min_lr, warmup_steps),
        weight_decay=cosine_schedule(step, total_steps, recipe.weight_decay, recipe.weight_decay_end),
        momentum=cosine_schedule(step, total_steps, recipe.momentum_teacher, recipe.momentum_teacher_end),
        teacher_temp=teacher_temp,
    )
