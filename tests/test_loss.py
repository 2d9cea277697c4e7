import math

import pytest
import torch

from hf_dino.loss import DinoLoss


def paper_loss(student_logits, teacher_logits, center, student_temp, teacher_temp, num_teacher=2):
    """Slow per-pair DINO loss written from the paper (Alg. 1 / Eq. 3), plus per-pair KL."""
    batch = teacher_logits.shape[0] // num_teacher
    num_student = student_logits.shape[0] // batch
    losses, kls, entropies = [], [], []
    for t in range(num_teacher):
        q = torch.softmax((teacher_logits[t * batch:(t + 1) * batch] - center) / teacher_temp, dim=-1)
        entropies.append(-(q * q.log()).sum(-1).mean())
        for v in range(num_student):
            if v == t:
                continue
            log_p = torch.log_softmax(student_logits[v * batch:(v + 1) * batch] / student_temp, dim=-1)
            cross_entropy = -(q * log_p).sum(-1)
            losses.append(cross_entropy.mean())
            kls.append((q * (q.log() - log_p)).sum(-1).mean())
    return torch.stack(losses).mean(), torch.stack(entropies).mean(), torch.stack(kls).mean()


@pytest.mark.parametrize("num_student_views", [2, 3, 8])
def test_loss_matches_per_pair_formula(num_student_views):
    torch.manual_seed(0)
    batch, out_dim = 5, 32
    loss_fn = DinoLoss(out_dim, student_temperature=0.1)
    loss_fn.center.copy_(torch.randn(1, out_dim) * 0.3)
    student = torch.randn(num_student_views * batch, out_dim, dtype=torch.float64)
    teacher = torch.randn(2 * batch, out_dim, dtype=torch.float64)
    output = loss_fn(student, teacher, teacher_temperature=0.04)
    expected_loss, expected_entropy, expected_kl = paper_loss(
        student, teacher, loss_fn.center.double(), 0.1, 0.04)
    torch.testing.assert_close(output.loss.double(), expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.teacher_entropy.double(), expected_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.kl_student_teacher.double(), expected_kl, rtol=1e-4, atol=1e-4)


def test_gradient_flows_to_student_only():
    loss_fn = DinoLoss(16)
    student = torch.randn(12, 16, requires_grad=True)
    teacher = torch.randn(4, 16, requires_grad=True)
    loss_fn(student, teacher, 0.04).loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_uniform_collapse_reads_ln_k():
    out_dim = 4096
    loss_fn = DinoLoss(out_dim)
    output = loss_fn(torch.zeros(8 * 3, out_dim), torch.zeros(2 * 3, out_dim), 0.04)
    assert output.loss.item() == pytest.approx(math.log(out_dim), rel=1e-5)  # 8.3178
    assert output.teacher_entropy.item() == pytest.approx(math.log(out_dim), rel=1e-5)
    assert output.kl_student_teacher.item() == pytest.approx(0.0, abs=1e-4)


def test_center_is_ema_of_batch_mean():
    torch.manual_seed(1)
    loss_fn = DinoLoss(8, center_momentum=0.9)
    first = torch.randn(6, 8)
    loss_fn.accumulate_center(first)
    loss_fn.update_center()
    torch.testing.assert_close(loss_fn.center, 0.1 * first.mean(0, keepdim=True))
    second = torch.randn(6, 8)
    loss_fn.accumulate_center(second)
    loss_fn.update_center()
    expected = 0.9 * 0.1 * first.mean(0, keepdim=True) + 0.1 * second.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected)


def test_center_updates_once_over_accumulated_micro_batches():
    torch.manual_seed(2)
    loss_fn = DinoLoss(8, center_momentum=0.9)
    micro_batches = [torch.randn(4, 8), torch.randn(4, 8)]
    for micro_batch in micro_batches:
        loss_fn.accumulate_center(micro_batch)
    loss_fn.update_center()
    torch.testing.assert_close(loss_fn.center, 0.1 * torch.cat(micro_batches).mean(0, keepdim=True))


def test_centering_changes_teacher_distribution():
    loss_fn = DinoLoss(4)
    teacher = torch.tensor([[2.0, 0.0, 0.0, 0.0]] * 2)
    before = loss_fn(torch.zeros(4, 4), teacher, 1.0).teacher_entropy
    loss_fn.center.copy_(torch.tensor([[2.0, 0.0, 0.0, 0.0]]))  # centring cancels the dominant dimension
    after = loss_fn(torch.zeros(4, 4), teacher, 1.0).teacher_entropy
    assert after.item() == pytest.approx(math.log(4), rel=1e-6)
    assert before.item() < after.item()


def test_rejects_inconsistent_view_counts():
    with pytest.raises(ValueError, match="multiple of the batch"):
        DinoLoss(4)(torch.zeros(7, 4), torch.zeros(4, 4), 0.04)
