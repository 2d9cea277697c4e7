"""The DINO loss: cross-entropy between the centred, sharpened teacher and the student.

For teacher views t (the global crops) and student views v (all crops), with
q_t = softmax((teacher_t - c) / teacher_temperature) and
log p_v = log_softmax(student_v / student_temperature), the loss is

    L = mean over pairs (t, v), t != v, of  mean over the batch of  -<q_t, log p_v>.

The sum over pairs factorises: sum_{t != v} -<q_t, log p_v> = -<sum_t q_t, sum_v log p_v>
+ sum_{t < T} <q_t, log p_t>, so no (t, v) pair is materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DinoLossOutput:
    """All scalars (0-d tensors, kept on device so logging needs no per-step host sync).

    loss: the DINO loss (mean cross-entropy over pairs and batch).
    teacher_entropy: mean entropy H(q_t) of the teacher distributions (ln K = uniform collapse).
    kl_student_teacher: mean KL(q_t || p_v) over the same pairs (-> 0 under either collapse).
    """

    loss: torch.Tensor
    teacher_entropy: torch.Tensor
    kl_student_teacher: torch.Tensor


class DinoLoss(nn.Module):
    """DINO cross-entropy with a centre kept as an EMA of the teacher outputs.

    Args:
        out_dim: K, the number of prototypes.
        num_teacher_views: T, the number of global crops the teacher sees (2).
        student_temperature: tau_s (0.1).
        center_momentum: EMA momentum of the centre (0.9).
    """

    def __init__(self, out_dim: int, num_teacher_views: int = 2, student_temperature: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.num_teacher_views = num_teacher_views
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Teacher outputs summed since the last centre update (several micro-batches under
        # gradient accumulation), so the centre moves once per optimizer step.
        self.register_buffer("pending_center_sum", torch.zeros(1, out_dim), persistent=False)
        self.register_buffer("pending_center_count", torch.zeros(()), persistent=False)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                teacher_temperature: float) -> DinoLossOutput:
        """
        Args:
            student_logits: (V * B, K), crops in order (global crops first, as the teacher's).
            teacher_logits: (T * B, K) for the T global crops; never back-propagated.
            teacher_temperature: tau_t for this step.
        """
        num_teacher = self.num_teacher_views
        batch = teacher_logits.shape[0] // num_teacher
        num_student = student_logits.shape[0] // batch
        if num_student * batch != student_logits.shape[0] or num_student < num_teacher:
            raise ValueError(
                f"student_logits has {student_logits.shape[0]} rows, not a multiple of the batch {batch} "
                f"with at least {num_teacher} views"
            )
        student_log_probs = torch.log_softmax(student_logits.float() / self.student_temperature, dim=-1)
        student_log_probs = student_log_probs.view(num_student, batch, -1)
        teacher_logits = teacher_logits.detach().float()
        teacher_scaled = (teacher_logits - self.center) / teacher_temperature
        teacher_probs = torch.softmax(teacher_scaled, dim=-1).view(num_teacher, batch, -1)

        # sum over t != v of <q_t, log p_v>, for each sample: (B,)
        all_pairs = (teacher_probs.sum(0) * student_log_probs.sum(0)).sum(-1)
        same_view = (teacher_probs * student_log_probs[:num_teacher]).sum((0, -1))
        num_pairs = num_teacher * num_student - num_teacher
        loss = -(all_pairs - same_view).mean() / num_pairs

        teacher_log_probs = torch.log_softmax(teacher_scaled, dim=-1)
        teacher_entropy = -(teacher_probs.flatten(0, 1) * teacher_log_probs).sum(-1).mean()
        # Each teacher view appears in the same number of pairs, so
        # mean_pairs KL(q_t||p_v) = mean_pairs CE(q_t, p_v) - mean_t H(q_t).
        return DinoLossOutput(loss=loss, teacher_entropy=teacher_entropy.detach(),
                              kl_student_teacher=(loss - teacher_entropy).detach())

    @torch.no_grad()
    def accumulate_center(self, teacher_logits: torch.Tensor) -> None:
        """Add a micro-batch of teacher outputs (T * B, K) to the pending centre statistics."""
        self.pending_center_sum += teacher_logits.float().sum(0, keepdim=True)
        self.pending_center_count += teacher_logits.shape[0]

    @torch.no_grad()
    def update_center(self) -> None:
        """c <- m c + (1 - m) mean(teacher outputs), the mean taken over all processes."""
        stats = torch.cat([self.pending_center_sum.flatten(), self.pending_center_count.view(1)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        batch_center = (stats[:-1] / stats[-1]).view_as(self.center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
        self.pending_center_sum.zero_()
        self.pending_center_count.zero_()
