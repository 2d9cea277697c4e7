"""Two CPU processes (gloo) give the loss trajectory of one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "vit_tiny", "--num_hidden_layers", "1", "--patch_size", "4", "--global_crop_size", "16",
        "--local_crop_size", "8", "--local_crops_number", "2", "--out_dim", "64", "--head_hidden_dim", "32",
        "--head_bottleneck_dim", "16", "--max_train_samples", "64", "--epochs", "2", "--warmup_epochs", "1",
        "--lr", "0.005", "--num_workers", "0", "--logging_steps", "1", "--knn_eval_at_end", "false",
        "--drop_path_rate", "0", "--use_bn_in_head", "false", "--num_threads", "1"]


def launch(output_dir: Path, num_processes: int, batch_size_per_device: int) -> list[dict]:
    # `accelerate launch --multi_gpu` starts the processes with torchrun; on a machine without a GPU
    # the trainer then forms a gloo group (Accelerate's `--cpu` launcher needs mpirun instead).
    launcher = ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else ["--num_processes", "1"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "scripts" / "pretrain.py"), *TINY, "--batch_size_per_device", str(batch_size_per_device),
               "--output_dir", str(output_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single = launch(tmp_path / "one", num_processes=1, batch_size_per_device=8)
    double = launch(tmp_path / "two", num_processes=2, batch_size_per_device=4)
    assert [m["step"] for m in single] == [m["step"] for m in double] == list(range(1, 17))
    for one, two in zip(single, double):
        assert two["lr"] == pytest.approx(one["lr"], rel=1e-12)  # lr scaled by the same global batch
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-5), (one["step"], one["loss"], two["loss"])
        assert two["teacher_entropy"] == pytest.approx(one["teacher_entropy"], rel=1e-4, abs=1e-5)
