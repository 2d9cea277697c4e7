"""The DINO loss: cross-entropy between the centred, sharpened teacher and the student.

For teacher views t (the global crops) and student views v (all crops), with
q_t = softmax((teacher_t - c) / teacher_temperature) and
log p_v = log_softmax(student_v / student_temperature), the loss is

    L = mean over pairs (t, v), t != v, of  mean over the batch of  -<q_t, log p_v>.

The sum over pairs factorises: sum_{t != v} -<q_t, log p_v> = -<sum_t q_t, sum_v log p_v>
+ sum_{t < T} <q_t, log p_t>, so no (t, v) pair is materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import all_reduce_


@dataclass
class DinoLossOutput:
    """All scalars (0-d tensors, kept on device so logging needs no per-step host sync).

    loss: the DINO loss (mean cross-entropy over pairs and batch).
    teacher_entropy: mean entropy H(q_t) of the teacher distributions (ln K = uniform collapse).
    kl_student_teacher: mean KL(q_t || p_v) over the same pairs (-> 0 under either collapse).
    koleo_loss: the KoLeo regulariser of the step (the trainer sets it when `koleo_loss_weight` > 0;
        `loss` stays the DINO loss alone).
    """

    loss: torch.Tensor
    teacher_entropy: torch.Tensor
    kl_student_teacher: torch.Tensor
    koleo_loss: torch.Tensor | None = None


TEACHER_CENTERINGS = ("center", "sinkhorn_knopp")


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, num_iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV; DINOv2's alternative to the EMA centre).

    Finds Q = diag(u) exp(scores) diag(v), rows summing to 1 (one distribution per sample) and,
    after `num_iterations` alternations, columns close to N / K (prototypes used equally by the batch),
    N counted over every process. Computed in the log domain: at a temperature of 0.02, scores span
    ~100 and exp() of them underflows float32, which would leave whole prototype columns at 0 / 0.
    scores: (N, K) teacher logits / temperature. Returns (N, K).
    """
    log_q = scores.float()
    num_samples = all_reduce_(torch.tensor(float(log_q.shape[0]), device=log_q.device))
    num_prototypes = log_q.shape[1]
    for _ in range(num_iterations):
        # each prototype's column sums to 1 / K over every process's samples
        column_max = all_reduce_(log_q.max(0, keepdim=True).values, "max")
        column_mass = all_reduce_(torch.exp(log_q - column_max).sum(0, keepdim=True))
        log_q = log_q - column_max - column_mass.log() - math.log(num_prototypes)
        # each sample's row sums to 1 / N
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - num_samples.log()
    return torch.exp(log_q) * num_samples


class DinoLoss(nn.Module):
    """DINO cross-entropy with a centre kept as an EMA of the teacher outputs.

    Args:
        out_dim: K, the number of prototypes.
        num_teacher_views: T, the number of global crops the teacher sees (2).
        student_temperature: tau_s (0.1).
        center_momentum: EMA momentum of the centre (0.9).
        centering: "center" (the paper: softmax of the logits minus the EMA centre) or
            "sinkhorn_knopp" (DINOv2's option: `sinkhorn_knopp` of the logits; the centre is still
            kept, for the logs and for switching back).
        sinkhorn_iterations: alternations of `sinkhorn_knopp` (3, as DINOv2).
    """

    def __init__(self, out_dim: int, num_teacher_views: int = 2, student_temperature: float = 0.1,
                 center_momentum: float = 0.9, centering: str = "center", sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in TEACHER_CENTERINGS:
            raise ValueError(f"centering must be one of {', '.join(TEACHER_CENTERINGS)}, got {centering!r}")
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
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
        if self.centering == "sinkhorn_knopp":
            teacher_scaled = teacher_logits / teacher_temperature
            teacher_probs = sinkhorn_knopp(teacher_scaled, self.sinkhorn_iterations).view(num_teacher, batch, -1)
        else:
            teacher_scaled = (teacher_logits - self.center) / teacher_temperature
            teacher_probs = torch.softmax(teacher_scaled, dim=-1).view(num_teacher, batch, -1)

        # sum over t != v of <q_t, log p_v>, for each sample: (B,)
        all_pairs = (teacher_probs.sum(0) * student_log_probs.sum(0)).sum(-1)
        same_view = (teacher_probs * student_log_probs[:num_teacher]).sum((0, -1))
        num_pairs = num_teacher * num_student - num_teacher
        loss = -(all_pairs - same_view).mean() / num_pairs

        teacher_entropy = -torch.special.xlogy(teacher_probs, teacher_probs).sum(-1).mean()
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
        stats = all_reduce_(torch.cat([self.pending_center_sum.flatten(), self.pending_center_count.view(1)]))
        batch_center = (stats[:-1] / stats[-1]).view_as(self.center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
        self.pending_center_sum.zero_()
        self.pending_center_count.zero_()


class KoLeoLoss(nn.Module):
    """The KoLeo regulariser (Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019;
    DINOv2 adds it to the DINO loss with weight 0.1): the Kozachenko-Leonenko estimate of the
    differential entropy of L2-normalised features, up to constants, negated so that minimising it
    spreads the features over the sphere.

        L = -mean_i log(||x_i - x_nn(i)|| + eps),  x = features / ||features||, nn(i) = argmin_{j != i} ||x_i - x_j||.

    Gradients flow through x_i and through its nearest neighbour x_nn(i); the choice of neighbour
    itself is not differentiated. A single point has no neighbour: L = 0 (with a zero gradient).
    The trainer passes the global batch (every process's rows, `distributed.gather_rows_with_gradients`),
    so that the neighbours and the value do not depend on the number of processes.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (N, D), one view of a batch. Returns a 0-d tensor (0 when N < 2)."""
        if features.dim() != 2:
            raise ValueError(f"KoLeo needs (N, D) features, got shape {tuple(features.shape)}")
        if features.shape[0] < 2:
            return features.float().sum() * 0.0
        normalised = nn.functional.normalize(features.float(), dim=-1, eps=self.eps)
        with torch.no_grad():
            similarity = normalised @ normalised.T
            similarity.fill_diagonal_(-2.0)  # below any cosine: a point is never its own neighbour
            neighbour = similarity.argmax(dim=1)
        distance = (normalised - normalised[neighbour]).norm(dim=-1)
        return -torch.log(distance + self.eps).mean()
