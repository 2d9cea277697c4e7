import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import training_step
from benchmarks.training_step import (BenchmarkSettings, _add_mfu, build_hf_dino_step, matmul_peak_flops,
                                      step_flops, time_interleaved)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(arch="vit_tiny", num_hidden_layers=2, patch_size=8, global_crop_size=32, local_crop_size=16,
            local_crops_number=2, batch_size=4, out_dim=256)


def analytic_step_flops(D=192, layers=2, patch=8, hidden=2048, bottleneck=256, K=256, global_size=32, local_size=16,
                        local_crops=2):
    """Matmul FLOPs per image of one DINO step, from the architecture: per token and block 24 D^2
    (qkv, projection, 4x MLP) plus 4 N D for attention. Backward = 2x forward, except the patch
    embedding (its input needs no gradient: weight gradient only, 1x) and flash attention (its
    backward recomputes the scores: 2.5x)."""
    def vit(size):
        tokens = (size // patch) ** 2 + 1
        dense = layers * tokens * 24 * D * D
        attention = layers * 4 * tokens * tokens * D
        embedding = (tokens - 1) * 2 * 3 * patch * patch * D
        return dense, attention, embedding

    head = 2 * (D * hidden + hidden * hidden + hidden * bottleneck) + 2 * bottleneck * K
    crops = [vit(global_size)] * 2 + [vit(local_size)] * local_crops
    student = sum(3 * dense + 3.5 * attention + 2 * embedding + 3 * head for dense, attention, embedding in crops)
    teacher = sum(dense + attention + embedding + head for dense, attention, embedding in crops[:2])
    return student + teacher


def test_step_flops_match_the_architectures_count():
    counted = step_flops(BenchmarkSettings(**TINY), "cpu")
    assert counted == pytest.approx(analytic_step_flops(), rel=1e-9)


def test_benchmarked_step_is_a_real_training_step():
    """One benchmarked step trains the student (AdamW moved it) and updates the teacher by the EMA
    formula teacher' = m * teacher + (1 - m) * student' with m = 0.996, on every parameter."""
    step = build_hf_dino_step(BenchmarkSettings(**TINY), "cpu")
    closure = dict(zip(step.__code__.co_freevars, (cell.cell_contents for cell in step.__closure__)))
    student, teacher = closure["student_parameters"], closure["teacher_parameters"]
    student_before = [p.detach().clone() for p in student]
    teacher_before = [p.detach().clone() for p in teacher]
    assert torch.isfinite(step())
    assert any(not torch.equal(b, p) for b, p in zip(student_before, student))  # the optimizer stepped
    for old, new, student_new in zip(teacher_before, teacher, student):
        torch.testing.assert_close(new.detach(), 0.996 * old + 0.004 * student_new.detach(), rtol=0, atol=1e-6)


def test_mfu_uses_the_peak_of_the_precision_run():
    values = {"train_img_per_s": 2.0}
    _add_mfu(values, flops_per_image=10.0, peaks={"fp32": 40.0, "bf16": 80.0}, mixed_precision="no")
    assert values["achieved_flops"] == 20.0 and values["mfu"] == 0.5 and values["mfu_bf16_peak"] == 0.25
    _add_mfu(values, flops_per_image=10.0, peaks={"fp32": 40.0, "bf16": 80.0}, mixed_precision="bf16")
    assert values["mfu"] == 0.25


def test_reference_precision_defaults_to_hf_dinos():
    assert BenchmarkSettings(mixed_precision="bf16").reference_precision == "bf16"
    assert BenchmarkSettings(mixed_precision="bf16", reference_mixed_precision="no").reference_precision == "no"


def test_matmul_peak_is_measured():
    assert matmul_peak_flops(torch.float32, size=256, repeats=2) > 1e8


@pytest.mark.parametrize("arguments, message", [
    (["--quality_only"], "--quality_only needs --quality_config"),
    (["--quality_config", "configs/demo_cifar10_cpu.yaml"], "--quality_config needs --reference_repo"),
    (["--keep_freed_cpu_memory", "maybe"], "argument --keep_freed_cpu_memory: Truthy value expected: got maybe"),
])
def test_benchmark_script_rejects_bad_options(arguments, message):
    """A bad flag value, or a quality comparison without its inputs, fails at once, before any
    measurement runs."""
    completed = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), *arguments],
                               capture_output=True, text=True, cwd=REPO, timeout=120)
    assert completed.returncode != 0
    assert message in completed.stderr


def test_interleaved_timing_alternates_and_times_each_step(monkeypatch):
    """Steps run in turn with the order reversed every round (A B, B A, ...), warm-up steps are
    not timed, and each timed step measures exactly its own duration (on a fake clock)."""
    calls, clock = [], [0.0]
    monkeypatch.setattr(training_step.time, "perf_counter", lambda: clock[0])

    def ticking(name, seconds):
        def step():
            calls.append(name)
            clock[0] += seconds
        return step

    seconds = time_interleaved({"fast": ticking("fast", 0.01), "slow": ticking("slow", 0.03)},
                               warmup_steps=1, timed_steps=4)
    assert calls == ["fast", "slow"] + ["fast", "slow", "slow", "fast"] * 2
    assert seconds == {"fast": [pytest.approx(0.01)] * 4, "slow": [pytest.approx(0.03)] * 4}


def test_supervised_bound_augment_is_a_reflect_padded_shift_or_its_mirror():
    """Each augmented image is one of the (2p + 1)^2 crops of numpy's reflect padding, or its mirror."""
    from benchmarks.supervised_bound import augment

    images = torch.randn(6, 3, 8, 8)
    out = augment(images, torch.Generator().manual_seed(3), padding=2)
    assert out.shape == images.shape
    for image, augmented in zip(images.numpy(), out.numpy()):
        padded = np.pad(image, ((0, 0), (2, 2), (2, 2)), mode="reflect")
        candidates = [crop for dy in range(5) for dx in range(5)
                      for crop in (padded[:, dy:dy + 8, dx:dx + 8], padded[:, dy:dy + 8, dx:dx + 8][:, :, ::-1])]
        assert any(np.array_equal(augmented, candidate) for candidate in candidates)
