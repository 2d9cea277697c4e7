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


# ---------------------------------------------------------------- Sinkhorn-Knopp targets
def sinkhorn_by_hand(scores, iterations):
    """SwAV's Sinkhorn-Knopp written from the paper with numpy loops: P = exp(scores), then alternately
    scale every prototype column to total 1/K and every sample row to total 1/N; returns N * P."""
    import numpy as np

    p = np.exp(np.asarray(scores, dtype=np.float64))
    p /= p.sum()
    n, k = p.shape
    for _ in range(iterations):
        for j in range(k):
            p[:, j] = p[:, j] / p[:, j].sum() / k
        for i in range(n):
            p[i, :] = p[i, :] / p[i, :].sum() / n
    return n * p


def test_sinkhorn_knopp_matches_the_hand_written_iterations():
    from hf_dino.loss import sinkhorn_knopp

    torch.manual_seed(0)
    scores = torch.randn(6, 4, dtype=torch.float64) * 3
    for iterations in (1, 3):
        torch.testing.assert_close(sinkhorn_knopp(scores, iterations).double(),
                                   torch.from_numpy(sinkhorn_by_hand(scores.numpy(), iterations)),
                                   rtol=1e-5, atol=1e-7)


def test_sinkhorn_knopp_two_by_two_by_hand():
    """scores log([[3, 1], [1, 1]]): columns (4, 2) -> [[3/8, 1/4], [1/8, 1/4]] (each column 1/2);
    rows (5/8, 3/8) -> [[3/5, 2/5], [1/3, 2/3]] after the row step (times N = 2, over 2)."""
    from hf_dino.loss import sinkhorn_knopp

    scores = torch.tensor([[3.0, 1.0], [1.0, 1.0]]).log()
    expected = torch.tensor([[3 / 5, 2 / 5], [1 / 3, 2 / 3]])
    torch.testing.assert_close(sinkhorn_knopp(scores, 1), expected)


def test_sinkhorn_knopp_balances_prototypes_and_survives_large_logits():
    from hf_dino.loss import sinkhorn_knopp

    torch.manual_seed(0)
    # cosine logits in [-1, 1] over a 0.02 temperature: exp() of them spans e^100, beyond float32
    scores = (torch.rand(64, 16) * 2 - 1) / 0.02
    q = sinkhorn_knopp(scores, 1000)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    torch.testing.assert_close(q.sum(0), torch.full((16,), 64 / 16), rtol=1e-3, atol=1e-3)


def test_sinkhorn_centering_targets_and_entropy():
    """With `centering="sinkhorn_knopp"` the targets are `sinkhorn_knopp` of logits / temperature (the
    EMA centre is ignored), and teacher_entropy is the targets' entropy."""
    from hf_dino.loss import sinkhorn_knopp

    torch.manual_seed(0)
    batch, out_dim = 4, 8
    loss_fn = DinoLoss(out_dim, centering="sinkhorn_knopp")
    loss_fn.center.fill_(5.0)
    student = torch.randn(3 * batch, out_dim, dtype=torch.float64)
    teacher = torch.randn(2 * batch, out_dim, dtype=torch.float64)
    q = sinkhorn_knopp(teacher / 0.04, 3).view(2, batch, out_dim).double()
    log_p = torch.log_softmax(student / 0.1, dim=-1).view(3, batch, out_dim)
    pairs = [-(q[t] * log_p[v]).sum(-1).mean() for t in range(2) for v in range(3) if v != t]
    output = loss_fn(student, teacher, 0.04)
    torch.testing.assert_close(output.loss.double(), torch.stack(pairs).mean(), rtol=1e-5, atol=1e-6)
    entropy = -torch.where(q > 0, q * q.log(), torch.zeros_like(q)).sum(-1).mean()  # 0 log 0 = 0
    torch.testing.assert_close(output.teacher_entropy.double(), entropy, rtol=1e-5, atol=1e-6)


def test_unknown_centering_is_rejected():
    with pytest.raises(ValueError, match="centering must be one of center, sinkhorn_knopp"):
        DinoLoss(8, centering="mean")


# ---------------------------------------------------------------- KoLeo
def koleo_by_hand(features):
    """-mean log(distance to the nearest other point) of the L2-normalised rows, with numpy."""
    import numpy as np

    x = np.asarray(features, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    distances = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)
    np.fill_diagonal(distances, np.inf)
    return -np.log(distances.min(1)).mean()


def test_koleo_three_points_by_hand():
    from hf_dino.loss import KoLeoLoss

    # normalised: (1, 0), (0, 1), (-1, 0): every nearest neighbour is sqrt(2) away
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert KoLeoLoss()(features).item() == pytest.approx(-0.5 * math.log(2.0), abs=1e-6)


def test_koleo_matches_numpy_and_pushes_neighbours_apart():
    from hf_dino.loss import KoLeoLoss

    torch.manual_seed(0)
    features = torch.randn(32, 8, requires_grad=True)
    loss = KoLeoLoss()(features)
    assert loss.item() == pytest.approx(koleo_by_hand(features.detach().numpy()), abs=1e-5)
    loss.backward()
    with torch.no_grad():  # a small step against the gradient spreads the points: the estimate drops
        assert KoLeoLoss()(features - 0.05 * features.grad).item() < loss.item()


def test_koleo_of_a_single_feature_is_zero_and_a_bad_shape_is_refused():
    """One image in the global batch has no neighbour: the term vanishes (no gradient), instead of
    stopping the run."""
    from hf_dino.loss import KoLeoLoss

    features = torch.randn(1, 4, requires_grad=True)
    loss = KoLeoLoss()(features)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(features.grad, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        KoLeoLoss()(torch.randn(4))
