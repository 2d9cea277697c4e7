"""Per-iteration schedules of the DINO recipe, in closed form (no precomputed arrays).

Each function maps an optimizer step (0-based) to a value, so resuming at step s needs only s.
"""

from __future__ import annotations

import math


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
