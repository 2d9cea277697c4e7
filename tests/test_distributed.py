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


SHARDED_WORKER = r'''
import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
from hf_dino.modeling_dino import DinoHead
from hf_dino.optimization import clip_gradients_per_parameter, ema_update

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
student = DinoHead(in_dim=12, out_dim=10, hidden_dim=9, bottleneck_dim=6, norm_last_layer=False)  # odd sizes: uneven shards
teacher = DinoHead(in_dim=12, out_dim=10, hidden_dim=9, bottleneck_dim=6, norm_last_layer=False)
teacher.requires_grad_(False)
full_student = {k: v.clone() for k, v in student.state_dict().items()}
full_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
grads = {name: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * (i + 1)
         for i, (name, p) in enumerate(student.named_parameters())}
fully_shard(student, mesh=mesh)
fully_shard(teacher, mesh=mesh)
for name, p in student.named_parameters():
    assert type(p).__name__ == "DTensor"
    p.grad = torch.distributed.tensor.distribute_tensor(grads[name], mesh, p.placements)
clip_gradients_per_parameter(list(student.parameters()), max_norm=3.0)
ema_update(list(teacher.parameters()), list(student.parameters()), momentum=0.9)

# the same on full, unsharded tensors, written out plainly
for name, p in student.named_parameters():
    g = grads[name]
    expected_grad = g * min(1.0, 3.0 / (g.norm().item() + 1e-6))
    torch.testing.assert_close(p.grad.full_tensor(), expected_grad, rtol=1e-5, atol=1e-6)
teacher_params = dict(teacher.named_parameters())
for name, p in student.named_parameters():
    expected = 0.9 * full_teacher[name] + 0.1 * full_student[name]
    torch.testing.assert_close(teacher_params[name].full_tensor(), expected, rtol=1e-6, atol=1e-7)
if dist.get_rank() == 0:
    print("SHARDED OK", flush=True)
dist.destroy_process_group()
'''


def test_clip_and_ema_on_fsdp2_shards_equal_the_unsharded_update(tmp_path):
    """FSDP2 (per-parameter DTensor shards) on 2 CPU processes: per-parameter clipping with the
    all-reduced shard norms and the shard-wise EMA give the full-tensor results."""
    worker = tmp_path / "worker.py"
    worker.write_text(SHARDED_WORKER)
    completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                                str(ROOT / "src")], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0 and "SHARDED OK" in completed.stdout, completed.stderr[-3000:]


@pytest.mark.parametrize("name, engine", [("single_gpu", "NO"), ("multi_gpu_ddp", "MULTI_GPU"),
                                          ("deepspeed_zero2", "DEEPSPEED"), ("fsdp_full_shard", "FSDP")])
def test_accelerate_configs_load(name, engine):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == engine and config.mixed_precision == "bf16"
    if engine == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2  # the shard-wise EMA needs per-parameter shards
    if engine == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2 and config.deepspeed_config["gradient_clipping"] == 3.0
