"""What a training run logs: the loss statistics between two log lines (`MetricsWindow`) and what
its data held over all processes (`DataCounts`: skipped images and batches, images trained on)."""

from __future__ import annotations

import logging
import time

import torch
from accelerate import Accelerator

from .distributed import gather_counts
from .loss import DinoLossOutput

logger = logging.getLogger(__name__)


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


class DataCounts:
    """Over all processes: images skipped (undecodable, or above the pixel budget), batches skipped
    by every process (some process had no image left in it), and images each process trained on.
    The methods that total over processes are collective (on `group`, a CPU gloo group)."""

    def __init__(self, num_processes: int):
        self.num_processes = num_processes
        self.group = None
        self.skipped_images = 0  # all processes together, up to the last total
        self._skipped_here = 0  # found by this process since then
        self.skipped_batches = 0
        self.images_per_process = [0] * num_processes

    def count_skipped(self, batch: dict) -> None:
        """Count a batch's skipped images ({"num_skipped", "skipped_indices"}); the first few are named
        in the log."""
        if batch["num_skipped"]:
            if self.skipped_images + self._skipped_here < 5:
                logger.warning("Skipped image(s) at dataset index %s", ", ".join(map(str, batch["skipped_indices"])))
            self._skipped_here += batch["num_skipped"]

    def total_skipped_images(self) -> int:
        """Images skipped so far by all processes together (collective)."""
        self.skipped_images += sum(gather_counts(self._skipped_here, self.num_processes, self.group))
        self._skipped_here = 0
        return self.skipped_images

    def end_epoch(self, epoch: int, images_here: int, steps: int, steps_per_epoch: int, log: bool) -> None:
        """Add the images each process trained on in `epoch` (collective); warn about a short epoch and,
        with `log`, log the counts."""
        counts = gather_counts(images_here, self.num_processes, self.group)
        self.images_per_process = [total + count for total, count in zip(self.images_per_process, counts)]
        if steps < steps_per_epoch:
            logger.warning("Epoch %d ran %d of %d steps (data exhausted on a process, or %d skipped batches so far)",
                           epoch, steps, steps_per_epoch, self.skipped_batches)
        if log:
            logger.info("Epoch %d: %d steps; images trained on per process: %s", epoch, steps, counts)

    def state(self) -> dict:
        """{"num_skipped_images", "num_skipped_batches", "images_per_process"} (collective)."""
        return {"num_skipped_images": self.total_skipped_images(), "num_skipped_batches": self.skipped_batches,
                "images_per_process": self.images_per_process}

    def load_state(self, state: dict) -> None:
        """The counts of a checkpoint's `state()` (images per process only if the process count is the same)."""
        self.skipped_images = state["num_skipped_images"]
        self.skipped_batches = state.get("num_skipped_batches", 0)
        if len(state.get("images_per_process", [])) == self.num_processes:
            self.images_per_process = state["images_per_process"]
