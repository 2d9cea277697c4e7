import numpy as np
import pytest

from hf_dino.schedules import cosine_schedule, teacher_temperature_schedule


def reference_cosine_array(base, final, epochs, steps_per_epoch, warmup_epochs=0, start_warmup=0.0):
    """The reference's array-building cosine schedule, written independently with numpy."""
    warmup_iters = warmup_epochs * steps_per_epoch
    warmup = np.linspace(start_warmup, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * steps_per_epoch - warmup_iters)
    decay = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, decay))


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3])
def test_cosine_matches_reference_array(warmup_epochs):
    epochs, steps_per_epoch = 10, 7
    expected = reference_cosine_array(5e-4, 1e-6, epochs, steps_per_epoch, warmup_epochs)
    total = epochs * steps_per_epoch
    values = [cosine_schedule(s, total, 5e-4, 1e-6, warmup_epochs * steps_per_epoch) for s in range(total)]
    np.testing.assert_allclose(values, expected, rtol=1e-12, atol=1e-15)


def test_cosine_closed_form_points():
    # weight decay 0.04 -> 0.4 over 100 steps: start, midpoint, end
    assert cosine_schedule(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_schedule(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_schedule(99, 100, 0.04, 0.4) == pytest.approx(0.4 - 0.18 * (1 + np.cos(np.pi * 99 / 100)), rel=1e-12)
    # teacher momentum 0.996 -> 1: its last step is just below 1, and steps past the end keep that value
    last = 1.0 - 0.002 * (1 + np.cos(np.pi * 99 / 100))
    assert cosine_schedule(99, 100, 0.996, 1.0) == pytest.approx(last, rel=1e-12) and last < 1.0
    assert cosine_schedule(10_000, 100, 0.996, 1.0) == cosine_schedule(99, 100, 0.996, 1.0)
    # linear warm-up reaches the base value at its last step
    assert cosine_schedule(9, 100, 1e-3, 0.0, warmup_steps=10) == pytest.approx(1e-3)
    assert cosine_schedule(0, 100, 1e-3, 0.0, warmup_steps=10) == 0.0


def test_teacher_temperature_warmup_then_constant():
    expected = np.concatenate((np.linspace(0.04, 0.07, 30), np.full(70, 0.07)))
    values = [teacher_temperature_schedule(e, 0.04, 0.07, 30) for e in range(100)]
    np.testing.assert_allclose(values, expected, rtol=1e-12)
    assert teacher_temperature_schedule(0, 0.04, 0.07, 0) == 0.07
    assert teacher_temperature_schedule(15, 0.04, 0.07, 30) == pytest.approx(0.04 + 0.03 * 15 / 29)
