"""benchmarks/gpu_check.py: its `--dry_run` (the code of the GPU run, at tiny sizes on the CPU)
writes every section with sane numbers, and two of them equal independent computations: the
FLOPs per image behind MFU (the architecture's formula) and the fp32 loss (the DINO loss written
out pair by pair on the logits of the same networks). The comparison with facebookresearch/dino
runs where a checkout is named by HF_DINO_REFERENCE_REPO (and HF_DINO_REFERENCE_PYTHON, an
interpreter that imports torchvision beside hf_dino); CI has none."""

import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import SECTIONS, run_section
from benchmarks.training_step import BenchmarkSettings, _crops, build_hf_dino_step
from hf_dino.configuration_dino import VIT_PRESETS
from tests.test_benchmark import analytic_step_flops

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
REFERENCE_REPO = os.environ.get("HF_DINO_REFERENCE_REPO")
REFERENCE_PYTHON = os.environ.get("HF_DINO_REFERENCE_PYTHON", sys.executable)


def run_gpu_check(*arguments: str, python: str = sys.executable, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(SCRIPT), *arguments], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("gpu_check") / "dry_run.json"
    completed = run_gpu_check("--dry_run", "--output_json", str(output))
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(output.read_text())


def test_dry_run_writes_every_section_with_sane_numbers(dry_run):
    assert dry_run["device"] == "cpu" and not dry_run["reference"]
    for name in SECTIONS:
        assert "error" not in dry_run[name], dry_run[name]["error"]
        assert 0 < dry_run[name]["wall_s"] < dry_run[name]["limit_s"]
    machine = dry_run["machine"]
    assert all(machine["matmul_peak_flops"][dtype] > 1e8 for dtype in ("fp32", "bf16", "fp16"))
    assert all(math.isfinite(loss) for loss in dry_run["loss"]["losses"]["hf_dino"])
    for name, implementations in (("throughput", ["hf_dino"]), ("compile", ["compiled", "eager"])):
        for implementation in implementations:
            values = dry_run[name][implementation]
            assert values["train_img_per_s"] > 0 and values["precision"] == "bf16"
            assert values["achieved_flops"] == pytest.approx(machine["flops_per_image"] * values["train_img_per_s"])
            assert 0 < values["mfu"] < 1 and values["mfu"] == values["mfu_bf16_peak"]
            assert math.isfinite(values["loss_after"])
    assert dry_run["compile"]["backend"] == "aot_eager" and dry_run["compile"]["ratios"]["compiled/eager"] > 0
    loader = dry_run["dataloader"]
    assert list(loader["workers"]) == [str(n) for n in sorted({min(n, os.cpu_count()) for n in (0, 1, 2)})]
    assert all(values["img_per_s"] > 0 and values["images"] > 0 for values in loader["workers"].values())
    assert loader["views"] == [32, 32, 16, 16] and min(loader["mean_image_size"]) >= 64


def test_dry_run_flops_per_image_are_the_architectures(dry_run):
    """MFU's numerator: the FLOPs the JSON counted equal the formula of test_benchmark."""
    settings = dry_run["settings"]
    expected = analytic_step_flops(
        D=VIT_PRESETS[settings["arch"]]["hidden_size"], layers=settings["num_hidden_layers"],
        patch=settings["patch_size"], K=settings["out_dim"], global_size=settings["global_crop_size"],
        local_size=settings["local_crop_size"], local_crops=settings["local_crops_number"])
    assert dry_run["machine"]["flops_per_image"] == pytest.approx(expected, rel=1e-9)


def test_dry_run_fp32_loss_is_the_dino_loss_of_its_networks(dry_run):
    """The first step's loss is the paper's loss on the same networks (rebuilt here from the same
    seed, in eval mode as the check runs them) and crops: the mean over (teacher view t, student
    view v != t) pairs of the batch mean of -<softmax(teacher_t / 0.04), log_softmax(student_v / 0.1)>,
    the centre being zero."""
    section = dry_run["loss"]
    settings = BenchmarkSettings(**section["settings"])
    assert settings.mixed_precision == "no" and section["teacher_temperature"] == 0.04
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        step = build_hf_dino_step(settings, "cpu")
    student, teacher = step.student.eval(), step.teacher.eval()
    crops = _crops(settings, "cpu")
    with torch.no_grad():
        teacher_probs = torch.softmax(teacher(crops[:2]).logits / 0.04, dim=-1).chunk(2)
        student_log_probs = torch.log_softmax(student(crops).logits / 0.1, dim=-1).chunk(len(crops))
    pairs = [-(q * log_p).sum(-1).mean() for t, q in enumerate(teacher_probs)
             for v, log_p in enumerate(student_log_probs) if v != t]
    assert len(pairs) == 2 * (len(crops) - 1)
    assert section["losses"]["hf_dino"][0] == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-5)


def _sleep(seconds: float) -> dict:
    time.sleep(seconds)
    return {"slept": seconds}


def _fail() -> dict:
    raise ValueError("boom")


def test_a_section_that_fails_or_overruns_is_recorded_and_stopped():
    context = multiprocessing.get_context("fork")
    overrun = run_section(context, _sleep, (60,), limit_s=1)
    assert overrun["error"] == "stopped at its limit of 1 s" and overrun["wall_s"] < 30
    failed = run_section(context, _fail, (), limit_s=30)
    assert "ValueError('boom')" in failed["error"]
    assert run_section(context, _sleep, (0,), limit_s=30)["slept"] == 0


@pytest.mark.parametrize("arguments, message", [
    (["--loader_workers", "-1"], "--loader_workers [-1]: must be >= 0"),
    pytest.param([], "--device cuda: no GPU is visible", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_options_fail_before_anything_runs(arguments, message, tmp_path):
    completed = run_gpu_check(*arguments, "--output_json", str(tmp_path / "out.json"), timeout=120)
    assert completed.returncode == 2 and message in completed.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.skipif(not REFERENCE_REPO, reason="set HF_DINO_REFERENCE_REPO to a facebookresearch/dino checkout")
def test_dry_run_matches_the_reference(tmp_path):
    """Same weights and crops: hf_dino's fp32 loss with the reference's position-embedding
    interpolation equals the reference's to float rounding, step after step; with its own
    interpolation it differs only by what the local crops' position embeddings change."""
    output = tmp_path / "reference.json"
    completed = run_gpu_check("--dry_run", "--reference_repo", REFERENCE_REPO, "--sections", "loss", "throughput",
                              "--output_json", str(output), python=REFERENCE_PYTHON)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text())
    differences = result["loss"]["relative_difference"]
    assert max(differences["hf_dino_reference_interpolation"]) < 1e-5
    assert max(differences["hf_dino"]) < 1e-2
    assert result["throughput"]["reference"]["train_img_per_s"] > 0
    assert result["throughput"]["reference"]["precision"] == "fp16"
    assert result["throughput"]["ratios"]["hf_dino/reference"] > 0
