import json
import math
import shutil

import pytest
import torch
from accelerate.utils import set_seed
from transformers import AutoModel, ViTModel, pipeline

import hf_dino  # noqa: F401
from hf_dino.loss import DinoLoss, DinoLossOutput
from hf_dino.modeling_dino import DinoModel
from hf_dino.recipe import DinoRecipe
from hf_dino.student_teacher import build_student_and_teacher
from hf_dino.checkpointing import find_latest_checkpoint
from hf_dino.trainer import DinoTrainer, NonFiniteLossError

METRIC_KEYS = {"step", "epoch", "loss", "lr", "weight_decay", "momentum", "teacher_temp", "img_per_s",
               "teacher_entropy", "kl_student_teacher"}


def tiny_recipe(output_dir, **overrides) -> DinoRecipe:
    values = dict(arch="vit_tiny", num_hidden_layers=1, patch_size=4, global_crop_size=16, local_crop_size=8,
                  local_crops_number=2, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                  batch_size_per_device=8, max_train_samples=32, epochs=2, warmup_epochs=1, lr=0.005,
                  num_workers=0, logging_steps=2, output_dir=str(output_dir), knn_eval_at_end=False,
                  knn_max_train_samples=200, warmup_teacher_temp_epochs=1)
    values.update(overrides)
    return DinoRecipe(**values)


def test_end_to_end_run_writes_the_contracted_outputs(tmp_path, capsys):
    results = DinoTrainer(tiny_recipe(tmp_path, knn_eval_at_end=True)).train()
    assert results["global_step"] == 8  # 32 images / batch 8 = 4 steps per epoch, 2 epochs
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6, 8]
    assert all(METRIC_KEYS <= set(line) for line in lines)
    assert lines[0]["teacher_temp"] == 0.04 and lines[-1]["teacher_temp"] == 0.07  # warm-up over epoch 0

    knn = results["knn"]
    assert {"top1", "top5", "k", "num_train", "num_val"} <= set(knn) and knn["num_val"] == 1000
    assert knn["split"] == "test"  # no "validation" split in the demo data: the fallback was used
    assert "split: test" in (tmp_path / "teacher_backbone" / "README.md").read_text()
    assert "k-NN (k=20, T=0.07)" in capsys.readouterr().out

    backbone_dir = tmp_path / "teacher_backbone"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (backbone_dir / name).exists(), name
    backbone, loading_info = AutoModel.from_pretrained(backbone_dir, output_loading_info=True)
    assert type(backbone) is ViTModel
    assert not loading_info["missing_keys"] and not loading_info["unexpected_keys"]
    cls_token = backbone(pixel_values=torch.randn(1, 3, 16, 16))
    torch.testing.assert_close(cls_token.pooler_output, cls_token.last_hidden_state[:, 0], rtol=0, atol=0)  # identity pooler
    extractor = pipeline("image-feature-extraction", model=str(backbone_dir))
    features = torch.tensor(extractor(_pil_image()))
    assert features.shape == (1, 1 + (16 // 4) ** 2, 192)

    dino = AutoModel.from_pretrained(tmp_path / "dino")
    assert isinstance(dino, DinoModel)
    torch.testing.assert_close(dino.backbone.state_dict()["layernorm.weight"], backbone.state_dict()["layernorm.weight"])


def _pil_image():
    from PIL import Image

    return Image.new("RGB", (40, 30), (120, 30, 200))


def test_last_layer_is_frozen_during_the_first_epoch(tmp_path):
    recipe = tiny_recipe(tmp_path, max_steps=3, freeze_last_layer=1, norm_last_layer=False)
    trainer = DinoTrainer(recipe)
    trainer.train()
    set_seed(recipe.seed)
    initial_student, _ = build_student_and_teacher(recipe)
    initial, trained = initial_student.head, trainer.student.head
    torch.testing.assert_close(trained.last_layer.parametrizations.weight.original1,
                               initial.last_layer.parametrizations.weight.original1, rtol=0, atol=0)
    torch.testing.assert_close(trained.last_layer_gain, initial.last_layer_gain, rtol=0, atol=0)
    assert not torch.equal(trained.mlp[0].weight, initial.mlp[0].weight)


def test_teacher_is_ema_of_student_and_gets_no_gradient(tmp_path):
    """One step at a constant momentum m = 0.7: teacher_1 = m * teacher_0 + (1 - m) * student_1,
    teacher_0 being the initial weights (the student's)."""
    recipe = tiny_recipe(tmp_path, max_steps=1, momentum_teacher=0.7, momentum_teacher_end=0.7, warmup_epochs=0)
    trainer = DinoTrainer(recipe)
    trainer.train()
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    set_seed(recipe.seed)
    initial, _ = build_student_and_teacher(recipe)
    initial_parameters, student_parameters = dict(initial.named_parameters()), dict(trainer.student.named_parameters())
    moved = 0.0
    for name, teacher_value in trainer.teacher.named_parameters():
        expected = 0.7 * initial_parameters[name].double() + 0.3 * student_parameters[name].double()
        torch.testing.assert_close(teacher_value.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
        moved = max(moved, (student_parameters[name] - initial_parameters[name]).abs().max().item())
    assert moved > 1e-4  # the student did move: the formula is not satisfied by teacher == student


def test_resume_from_checkpoint_is_exact(tmp_path):
    uninterrupted = tmp_path / "full"
    DinoTrainer(tiny_recipe(uninterrupted, checkpointing_steps=3, epochs=2)).train()
    assert sorted(p.name for p in uninterrupted.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not list(uninterrupted.glob("*.tmp"))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-3", resumed / "checkpoint-3")
    trainer = DinoTrainer(tiny_recipe(resumed, checkpointing_steps=3, epochs=2, resume_from_checkpoint="latest"))
    results = trainer.train()
    assert results["global_step"] == 8
    expected = AutoModel.from_pretrained(uninterrupted / "dino").state_dict()
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_save_total_limit_and_latest(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    trainer = DinoTrainer(tiny_recipe(tmp_path, checkpointing_steps=2, save_total_limit=2))
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-8"
    (tmp_path / "checkpoint-10.tmp").mkdir()  # an interrupted write is not a checkpoint
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-8")
    # each checkpoint holds the teacher backbone as a plain transformers folder (here: the final teacher)
    backbone = AutoModel.from_pretrained(tmp_path / "checkpoint-8" / "teacher_backbone")
    assert type(backbone) is ViTModel
    teacher_state = trainer.teacher.backbone.state_dict()
    for name, value in backbone.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(value, teacher_state[name]), name


def test_non_finite_loss_stops_with_the_step(tmp_path, monkeypatch):
    original = DinoLoss.forward

    def exploding(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        return DinoLossOutput(output.loss * float("nan"), output.teacher_entropy, output.kl_student_teacher)

    monkeypatch.setattr(DinoLoss, "forward", exploding)
    with pytest.raises(NonFiniteLossError, match="between steps 1 and 2"):
        DinoTrainer(tiny_recipe(tmp_path)).train()


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    """2 accumulated micro-batches of 4 == one batch of 8 (the same images: the seeded shuffle does
    not depend on the batch size): same steps, losses, student and teacher, to fp32 summation
    order. No warm-up and a teacher momentum of 0.5, so that both models move far from the start."""
    overrides = dict(epochs=1, logging_steps=1, warmup_epochs=0, momentum_teacher=0.5, momentum_teacher_end=0.5)
    big = DinoTrainer(tiny_recipe(tmp_path / "big", batch_size_per_device=8, **overrides))
    big_results = big.train()
    accumulated = DinoTrainer(tiny_recipe(tmp_path / "accumulated", batch_size_per_device=4,
                                          gradient_accumulation_steps=2, **overrides))
    accumulated_results = accumulated.train()
    assert big_results["global_step"] == accumulated_results["global_step"] == 4
    big_lines, accumulated_lines = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                                    for name in ("big", "accumulated"))
    for one, two in zip(big_lines, accumulated_lines, strict=True):
        assert two["lr"] == one["lr"] and two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for model in ("student", "teacher"):
        expected = getattr(big, model).state_dict()
        for name, value in getattr(accumulated, model).state_dict().items():
            if name.endswith("k_proj.bias"):
                # softmax over keys ignores a bias shared by all keys: its true gradient is 0, and AdamW
                # turns the rounding noise left in its place into full-size steps of either sign
                continue
            torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-5, msg=f"{model} {name}")
    set_seed(big.recipe.seed)
    initial, _ = build_student_and_teacher(big.recipe)
    moved = max((big.teacher.state_dict()[name] - value).abs().max().item()
                for name, value in initial.state_dict().items())
    assert moved > 2e-4  # the tolerance above is under 1/20 of how far the teacher moved (3.4e-4)


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from accelerate import Accelerator

    original_save_state = Accelerator.save_state
    calls = []

    def crash_on_second_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            original_save_state(self, output_dir, **kwargs)  # a partly written folder...
            raise KeyboardInterrupt("killed while writing")  # ...then the process dies
        return original_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        DinoTrainer(tiny_recipe(tmp_path, checkpointing_steps=3)).train()
    assert (tmp_path / "checkpoint-6.tmp").exists() and not (tmp_path / "checkpoint-6").exists()
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-3"
    monkeypatch.setattr(Accelerator, "save_state", original_save_state)
    results = DinoTrainer(tiny_recipe(tmp_path, checkpointing_steps=3, resume_from_checkpoint="latest")).train()
    assert results["global_step"] == 8 and (tmp_path / "checkpoint-6").exists()


def test_online_knn_is_logged_with_the_step_metrics(tmp_path):
    DinoTrainer(tiny_recipe(tmp_path, eval_every=3, knn_max_train_samples=100)).train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in lines if "knn_top1" in line]
    assert [line["step"] for line in evaluated] == [3, 6]
    assert all(METRIC_KEYS <= set(line) and 0 <= line["knn_top1"] <= 100 for line in evaluated)
    assert all(METRIC_KEYS <= set(line) for line in lines)


def test_streaming_run(tmp_path):
    results = DinoTrainer(tiny_recipe(tmp_path, streaming=True, max_train_samples=32, epochs=1)).train()
    assert results["global_step"] == 4
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]


@pytest.mark.parametrize("fail", [False, True])
def test_push_at_every_checkpoint_and_at_the_end(tmp_path, monkeypatch, fail):
    import huggingface_hub

    from test_hub import RecordingApi

    api = RecordingApi(fail=fail)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    recipe = tiny_recipe(tmp_path, push_to_hub=True, hub_model_id="me/tiny-dino", checkpointing_steps=4)
    results = DinoTrainer(recipe).train()  # a failing Hub never stops training
    assert results["push"] == {"repo_id": "me/tiny-dino", "succeeded": 0 if fail else 3, "failed": 3 if fail else 0}
    assert json.loads((tmp_path / "results.json").read_text())["push"] == results["push"]
    if not fail:
        assert [u["message"] for u in api.uploads] == [
            "DINO teacher backbone, step 4", "DINO teacher backbone, step 8", "DINO teacher backbone, step 8 (final)"]
        for upload in api.uploads:
            assert upload["files"] == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
            assert upload["card"].data.pipeline_tag == "image-feature-extraction"


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    """A real `kill -9` of a training process, then `--resume_from_checkpoint latest`: the final
    teacher equals the uninterrupted run's bit for bit (CPU)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from safetensors.torch import load_file

    script = Path(__file__).resolve().parents[1] / "scripts" / "pretrain.py"
    args = ["--arch", "vit_tiny", "--num_hidden_layers", "2", "--patch_size", "4", "--global_crop_size", "16",
            "--local_crop_size", "8", "--local_crops_number", "2", "--out_dim", "64", "--head_hidden_dim", "32",
            "--head_bottleneck_dim", "16", "--batch_size_per_device", "8", "--max_train_samples", "64",
            "--epochs", "6", "--warmup_epochs", "1", "--num_workers", "0", "--checkpointing_steps", "4",
            "--knn_eval_at_end", "false", "--num_threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(output_dir, *extra):
        return subprocess.run([sys.executable, str(script), *args, "--output_dir", str(output_dir), *extra],
                              env=env, capture_output=True, text=True)

    completed = run(tmp_path / "full")
    assert completed.returncode == 0, completed.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(script), *args, "--output_dir", str(killed_dir)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed_dir / "checkpoint-12").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (killed_dir / "dino").exists()
    completed = run(killed_dir, "--resume_from_checkpoint", "latest")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Resumed from" in completed.stderr

    expected = load_file(str(tmp_path / "full" / "dino" / "model.safetensors"))
    resumed = load_file(str(killed_dir / "dino" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def write_bad_image_folder(root):
    """An image folder (two classes) holding every awkward kind of file a crawl produces."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def rgb(height, width):
        return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))

    cats, dogs = root / "train" / "cat", root / "train" / "dog"
    cats.mkdir(parents=True)
    dogs.mkdir(parents=True)
    for i in range(6):
        rgb(40, 48).save(cats / f"good{i}.jpg")
        rgb(36, 36).save(dogs / f"good{i}.png")
    rgb(40, 40).convert("L").save(cats / "grayscale.png")
    rgba = rgb(40, 40).convert("RGBA")
    rgba.putalpha(Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)))
    rgba.save(cats / "rgba.png")
    rgb(40, 40).convert("CMYK").save(cats / "cmyk.jpg")
    rgb(40, 40).convert("P").save(dogs / "palette.png")
    Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)).save(dogs / "sixteen_bit.png")
    rgb(1, 1).save(dogs / "one_pixel.png")
    rgb(12, 10_240).save(dogs / "very_wide.png")
    buffer = io.BytesIO()
    rgb(64, 64).save(buffer, format="JPEG")
    (cats / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (cats / "corrupt.jpg").write_bytes(rng.bytes(2048))
    (dogs / "empty.png").write_bytes(b"")
    return 3  # undecodable files: truncated, corrupt, empty


def test_run_over_a_folder_of_bad_images_skips_and_counts(tmp_path, caplog):
    import logging

    bad = write_bad_image_folder(tmp_path / "images")  # 12 good + 7 odd-but-readable + 3 broken = 22 files
    recipe = tiny_recipe(tmp_path / "run", dataset_name=str(tmp_path / "images"), max_train_samples=None,
                         batch_size_per_device=11, epochs=2)
    with caplog.at_level(logging.WARNING):
        results = DinoTrainer(recipe).train()
    assert results["global_step"] == 4  # 22 files / 11 per batch, 2 epochs: nothing dropped, nothing crashed
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["num_skipped_images"] == 2 * bad  # each epoch meets the three broken files
    assert "Skipped image(s)" in caplog.text and "corrupt.jpg" in caplog.text and "undecodable" in caplog.text
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)


def test_fp16_grad_scaler_path_unscales_before_clipping(tmp_path, monkeypatch):
    """The fp16 path (loss scaled, gradients unscaled, clipped, scaler.step) with fp32 compute:
    a power-of-two loss scale must change nothing. SGD and a tight clip make any clip-before-
    unscale visible (the update would shrink by the scale), and the scaler joins the checkpoint."""
    import contextlib

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    def accelerator(with_scaler):
        acc = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        if with_scaler:
            acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), True
            acc.autocast = contextlib.nullcontext  # keep fp32 compute: only the scaler path differs
        return acc

    overrides = dict(optimizer="sgd", lr=0.5, clip_grad=0.01, epochs=1, checkpointing_steps=4)
    plain = DinoTrainer(tiny_recipe(tmp_path / "plain", **overrides), accelerator(False))
    plain.train()
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
    scaled = DinoTrainer(tiny_recipe(tmp_path / "scaled", **overrides), accelerator(True))
    scaled.train()
    assert scaled.accelerator.scaler.get_scale() == 2.0 ** 12  # no overflow, no skipped step
    for name, value in plain.teacher.state_dict().items():
        torch.testing.assert_close(scaled.teacher.state_dict()[name], value, rtol=1e-5, atol=1e-7)
    assert (tmp_path / "scaled" / "checkpoint-4" / "scaler.pt").exists()


def test_gradient_checkpointing_recomputes_blocks_and_changes_nothing(tmp_path):
    calls = {True: 0, False: 0}
    teachers = {}
    for enabled in (False, True):
        trainer = DinoTrainer(tiny_recipe(tmp_path / str(enabled), gradient_checkpointing=enabled, epochs=1,
                                          drop_path_rate=0.1))
        original = DinoModel.forward

        def counting_forward(self, *args, _enabled=enabled, **kwargs):
            fc1 = self.backbone.layers[0].mlp.fc1
            if self.training and torch.is_grad_enabled() and not hasattr(fc1, "_counted"):
                fc1._counted = True
                fc1.register_forward_hook(lambda *a, _e=_enabled: calls.__setitem__(_e, calls[_e] + 1))
            return original(self, *args, **kwargs)

        DinoModel.forward = counting_forward
        try:
            trainer.train()
        finally:
            DinoModel.forward = original
        teachers[enabled] = trainer.teacher.state_dict()
    assert calls[True] == 2 * calls[False] > 0  # each block runs again during backward
    for name, value in teachers[False].items():
        torch.testing.assert_close(teachers[True][name], value, rtol=1e-5, atol=1e-6)


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate's state is a process-wide singleton fixed by the first `Accelerator`: a test
    with another mixed precision starts from, and leaves, a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_on_a_cpu_runs_under_autocast_with_eager_attention(tmp_path, fresh_accelerator_state):
    trainer = DinoTrainer(tiny_recipe(tmp_path, mixed_precision="bf16", epochs=1))
    matmul_dtypes = {"student": set(), "teacher": set()}
    original = DinoModel.forward

    def recording_forward(self, *args, **kwargs):
        role = "student" if self.training and torch.is_grad_enabled() else "teacher"
        fc1 = self.backbone.layers[0].mlp.fc1
        if not hasattr(fc1, "_recorded"):
            fc1._recorded = True
            fc1.register_forward_hook(lambda module, inputs, output, _r=role: matmul_dtypes[_r].add(output.dtype))
        return original(self, *args, **kwargs)

    DinoModel.forward = recording_forward
    try:
        results = trainer.train()
    finally:
        DinoModel.forward = original
    assert matmul_dtypes == {"student": {torch.bfloat16}, "teacher": {torch.bfloat16}}
    assert trainer.student.config._attn_implementation == trainer.teacher.config._attn_implementation == "eager"
    assert trainer.teacher.head.last_layer.parametrizations.weight.original1.dtype == torch.float32  # fp32 master weights
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert results["global_step"] == 4 and all(math.isfinite(line["loss"]) for line in lines)
    # the kernel is a training choice, not part of the saved model
    assert AutoModel.from_pretrained(tmp_path / "teacher_backbone").config._attn_implementation == "sdpa"


FAULTS_OF_REALLOCATION = """
import resource, sys, torch
from hf_dino.cpu_runtime import keep_freed_cpu_memory
applied = keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
for _ in range(3):  # warm: 64 MB tensors, above glibc's largest mmap threshold
    torch.ones(16 * 2 ** 20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(16 * 2 ** 20).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_cpu_memory_stops_page_faulting_reallocated_tensors():
    import subprocess
    import sys

    pages_per_tensor = 64 * 2 ** 20 // 4096
    results = {}
    for mode in ("default", "keep"):
        output = subprocess.run([sys.executable, "-c", FAULTS_OF_REALLOCATION, mode], capture_output=True, text=True,
                                check=True).stdout.split()
        results[mode] = (output[0] == "True", int(output[1]))
    assert results["default"][1] >= 4 * pages_per_tensor  # each new 64 MB tensor is a fresh mapping
    assert results["keep"][0] and results["keep"][1] < pages_per_tensor  # the freed block is reused


@pytest.mark.slow
def test_torch_compile_trains_the_same_model(tmp_path):
    from torch._dynamo.utils import counters

    losses, teachers = {}, {}
    for compiled in (False, True):
        counters.clear()
        trainer = DinoTrainer(tiny_recipe(tmp_path / str(compiled), torch_compile=compiled, epochs=1, drop_path_rate=0.0))
        trainer.train()
        assert (counters["stats"]["unique_graphs"] > 0) == compiled
        losses[compiled] = [json.loads(line)["loss"] for line in (tmp_path / str(compiled) / "metrics.jsonl").open()]
        teachers[compiled] = trainer.teacher.state_dict()
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    for name, value in teachers[False].items():
        torch.testing.assert_close(teachers[True][name], value, rtol=1e-4, atol=1e-5)


def test_bf16_on_a_cpu_without_bf16_hardware_warns(tmp_path, fresh_accelerator_state, monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level("WARNING", logger="hf_dino.cpu_runtime"):
        DinoTrainer(tiny_recipe(tmp_path, mixed_precision="bf16"))
    assert "without bf16 matmul hardware" in caplog.text and "--mixed_precision no" in caplog.text


def test_mixed_precision_unset_follows_the_launcher(tmp_path, fresh_accelerator_state, monkeypatch):
    """`accelerate launch --mixed_precision bf16` exports ACCELERATE_MIXED_PRECISION: an unset
    recipe value takes it; a value in the recipe overrides it."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert DinoTrainer(tiny_recipe(tmp_path, mixed_precision=None)).accelerator.mixed_precision == "bf16"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert DinoTrainer(tiny_recipe(tmp_path, mixed_precision="no")).accelerator.mixed_precision == "no"


def test_batch_norms_become_synchronised_on_several_processes():
    """GPU processes: torch's SyncBatchNorm; CPU processes: ProcessGroupBatchNorm; one process:
    unchanged. The state dict (keys and values) stays the model's."""
    from hf_dino.distributed import synchronize_batch_norms

    recipe = DinoRecipe(**{**tiny_recipe("unused").to_dict(), "use_bn_in_head": True})

    def batch_norm_types(model):
        return {type(module).__name__ for module in model.modules() if "BatchNorm" in type(module).__name__}

    for num_processes, device_type, expected in ((1, "cuda", "BatchNorm1d"), (2, "cpu", "ProcessGroupBatchNorm"),
                                                 (2, "cuda", "SyncBatchNorm")):
        student, teacher = build_student_and_teacher(recipe)
        reference_state = {k: v.clone() for k, v in teacher.state_dict().items()}
        synced_student, synced_teacher = synchronize_batch_norms(student, teacher, num_processes, device_type)
        assert batch_norm_types(synced_student) == batch_norm_types(synced_teacher) == {expected}
        assert synced_teacher.state_dict().keys() == reference_state.keys()
        assert all(torch.equal(synced_teacher.state_dict()[k], v) for k, v in reference_state.items())


def write_streamed_images(folder, num_bad_first: int, num_good: int) -> None:
    """One parquet shard: `num_bad_first` undecodable images, then `num_good` PNGs."""
    import io

    import datasets
    import numpy as np
    from PIL import Image

    def png(value):
        buffer = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), value % 256, np.uint8)).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    images = [{"bytes": b"not an image", "path": None}] * num_bad_first + [png(11 * i) for i in range(num_good)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    folder.mkdir(parents=True)
    datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(len(images))]},
                               features=features).to_parquet(str(folder / "train.parquet"))


def test_a_batch_of_only_undecodable_images_is_skipped_and_counted(tmp_path):
    write_streamed_images(tmp_path / "data", num_bad_first=8, num_good=24)  # batch 0 all bad (stream order)
    recipe = tiny_recipe(tmp_path / "run", dataset_name=str(tmp_path / "data"), streaming=True, shuffle_buffer_size=1,
                         max_train_samples=32, epochs=1, logging_steps=1)
    results = DinoTrainer(recipe).train()
    assert results["global_step"] == 3 and results["num_skipped_batches"] == 1  # 4 batches, the first skipped
    assert results["num_skipped_images"] == 8 and results["images_per_process"] == [24]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and lines[-1]["num_skipped_batches"] == 1


# ---------------------------------------------------------------------------- the loop's named parts
def two_batches_of_crops(seed: int = 0) -> list[list[torch.Tensor]]:
    """Two batches of 4 images: 2 global crops of 16 px and 2 local crops of 8 px each."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(4, 3, size, size, generator=generator) for size in (16, 16, 8, 8)] for _ in range(2)]


def test_training_step_accumulates_then_steps_the_student_teacher_and_centre(tmp_path):
    """Gradient accumulation 2: the first batch only accumulates (no model moves); the second
    completes the step: the student moves, except its last layer in a frozen epoch; the teacher
    becomes m * teacher_0 + (1 - m) * student_1; the centre becomes 0.9 * 0 + 0.1 * the mean
    teacher output over both batches' global crops, computed here with a copy of teacher_0."""
    import copy

    recipe = tiny_recipe(tmp_path, gradient_accumulation_steps=2, batch_size_per_device=4, warmup_epochs=0,
                         momentum_teacher=0.7, momentum_teacher_end=0.7, freeze_last_layer=1, norm_last_layer=False)
    trainer = DinoTrainer(recipe)
    run = trainer.set_up()
    run.student.train(), run.teacher.train()
    student_0 = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    teacher_0 = copy.deepcopy(run.teacher)
    batches = two_batches_of_crops()
    schedule = trainer.schedule(run, epoch=0)
    assert schedule.momentum == 0.7 and schedule.teacher_temp == recipe.warmup_teacher_temp

    output, stepped = trainer.training_step(run, batches[0], schedule, epoch=0)
    assert not stepped and math.isfinite(output.loss.item())
    for name, value in trainer.student.state_dict().items():
        assert torch.equal(value, student_0[name]), name
    for name, value in run.teacher.state_dict().items():
        assert torch.equal(value, teacher_0.state_dict()[name]), name
    assert torch.equal(run.dino_loss.center, torch.zeros(1, recipe.out_dim))

    _, stepped = trainer.training_step(run, batches[1], schedule, epoch=0)
    assert stepped
    student_1 = trainer.student.state_dict()
    assert not torch.equal(student_1["head.mlp.0.weight"], student_0["head.mlp.0.weight"])
    last_layer = "head.last_layer.parametrizations.weight.original1"
    assert torch.equal(student_1[last_layer], student_0[last_layer])  # frozen in epoch 0
    for name, value in run.teacher.named_parameters():
        expected = 0.7 * teacher_0.state_dict()[name].double() + 0.3 * student_1[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():
        teacher_outputs = torch.cat([teacher_0(crops[:2]).logits for crops in batches])  # (2 batches x 2 crops x 4, K)
    torch.testing.assert_close(run.dino_loss.center, 0.1 * teacher_outputs.mean(0, keepdim=True), rtol=1e-5, atol=1e-7)


def test_schedule_scales_the_learning_rate_by_the_global_batch(tmp_path):
    """base lr = lr * global batch / 256 (global batch = 4 per process x 2 accumulated = 8); without
    warm-up the lr at step s of n is min + (base - min) (1 + cos(pi s / n)) / 2; the teacher
    temperature warms up per epoch: 0.04 at epoch 0, 0.07 from epoch 1 (warm-up of 2 epochs)."""
    recipe = tiny_recipe(tmp_path, gradient_accumulation_steps=2, batch_size_per_device=4, warmup_epochs=0,
                         lr=0.0128, min_lr=1e-6, warmup_teacher_temp_epochs=2)
    trainer = DinoTrainer(recipe)
    run = trainer.set_up()
    assert (run.global_batch, run.steps_per_epoch, run.total_steps) == (8, 4, 8)
    assert run.base_lr == pytest.approx(0.0128 * 8 / 256)
    run.global_step = 3
    schedule = trainer.schedule(run, epoch=0)
    expected = 1e-6 + (0.0004 - 1e-6) * (1 + math.cos(math.pi * 3 / 8)) / 2
    assert schedule.lr == pytest.approx(expected, rel=1e-12)
    assert schedule.teacher_temp == pytest.approx(0.04)
    assert trainer.schedule(run, epoch=1).teacher_temp == pytest.approx(0.07)


def test_warm_ups_counted_in_steps_override_the_epochs(tmp_path):
    """warmup_steps 3: the lr at step 1 is base * 1 / (3 - 1) (the reference's linspace, 0 -> base);
    warmup_teacher_temp_steps 5: the temperature at step 2 is 0.04 + 0.03 * 2 / 4, whatever the epoch."""
    trainer = DinoTrainer(tiny_recipe(tmp_path, warmup_epochs=2, warmup_steps=3, warmup_teacher_temp_epochs=2,
                                      warmup_teacher_temp_steps=5))
    run = trainer.set_up()
    run.global_step = 1
    assert trainer.schedule(run, epoch=0).lr == pytest.approx(run.base_lr / 2, rel=1e-12)
    run.global_step = 2
    assert trainer.schedule(run, epoch=1).teacher_temp == pytest.approx(0.055, rel=1e-12)
    run.global_step = 5
    assert trainer.schedule(run, epoch=1).teacher_temp == pytest.approx(0.07, rel=1e-12)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        tiny_recipe(tmp_path, warmup_steps=-1).validate()


def test_logging_evaluation_and_checkpoints_fall_due_at_their_steps(tmp_path):
    from types import SimpleNamespace

    trainer = DinoTrainer(tiny_recipe(tmp_path, logging_steps=3, eval_every=4, checkpointing_steps=5))

    def due(check):
        return [step for step in range(1, 11) if check(SimpleNamespace(global_step=step, total_steps=10))]

    assert due(trainer.logging_due) == [3, 6, 9, 10]  # and at the last step
    assert due(trainer.evaluation_due) == [4, 8]  # never at the last step: the final evaluation follows
    assert due(trainer.checkpoint_due) == [5, 10]
    never = DinoTrainer(tiny_recipe(tmp_path))  # eval_every and checkpointing_steps unset
    assert due(never.evaluation_due) == due(never.checkpoint_due) == []


def test_metrics_window_averages_over_steps_and_accumulated_batches():
    """Two steps of two accumulated batches with losses (1, 3) and (5, 7): per-step means 2 and 6,
    window mean 4; entropies all 0.5; 4 batches of 8 images."""
    from accelerate import Accelerator

    from hf_dino.training_metrics import MetricsWindow

    window = MetricsWindow(torch.device("cpu"))
    for losses in ((1.0, 3.0), (5.0, 7.0)):
        for loss in losses:
            window.add(DinoLossOutput(torch.tensor(loss), torch.tensor(0.5), torch.tensor(loss / 10)), 8, 2)
        window.steps += 1
    assert window.means(Accelerator(cpu=True)) == pytest.approx(
        {"loss": 4.0, "teacher_entropy": 0.5, "kl_student_teacher": 0.4})
    assert window.images == 32
    window.reset()
    assert (window.steps, window.images, window.sums["loss"].item()) == (0, 0, 0.0)


def test_koleo_regulariser_adds_its_gradient_and_is_logged(tmp_path):
    """With koleo_loss_weight w, the student's accumulated gradient is that of (DINO loss + w x mean over the
    two global crops of -mean log nearest-neighbour distance of the normalised backbone features) / 2
    (gradient accumulation 2), the KoLeo term written out here; metrics.jsonl logs koleo_loss."""
    import copy

    recipe = tiny_recipe(tmp_path, gradient_accumulation_steps=2, batch_size_per_device=4, warmup_epochs=0,
                         koleo_loss_weight=0.5, drop_path_rate=0.0, clip_grad=0.0)
    trainer = DinoTrainer(recipe)
    run = trainer.set_up()
    run.student.train(), run.teacher.train()
    student_0, teacher_0 = copy.deepcopy(trainer.student), copy.deepcopy(run.teacher)
    crops = two_batches_of_crops()[0]
    schedule = trainer.schedule(run, epoch=1)
    output, stepped = trainer.training_step(run, crops, schedule, epoch=1)
    assert not stepped and output.koleo_loss is not None

    with torch.no_grad():
        teacher_logits = teacher_0(crops[:2]).logits
    student_output = student_0(crops)
    dino = DinoLoss(recipe.out_dim)(student_output.logits, teacher_logits, schedule.teacher_temp).loss
    koleo_terms = []
    for features in student_output.features[:8].chunk(2):
        x = torch.nn.functional.normalize(features, dim=-1)
        distances = torch.cdist(x, x) + torch.eye(4) * 10  # never one's own neighbour
        koleo_terms.append(-torch.log(distances.min(1).values).mean())
    koleo = torch.stack(koleo_terms).mean()
    torch.testing.assert_close(output.koleo_loss, koleo, rtol=1e-5, atol=1e-6)
    ((dino + 0.5 * koleo) / 2).backward()
    for (name, parameter), expected in zip(trainer.student.named_parameters(), student_0.parameters()):
        if expected.grad is not None:
            torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=name)

    DinoTrainer(tiny_recipe(tmp_path / "run", koleo_loss_weight=0.1)).train()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["koleo_loss"]) for line in lines)


def test_sinkhorn_knopp_centering_trains(tmp_path):
    DinoTrainer(tiny_recipe(tmp_path, teacher_centering="sinkhorn_knopp")).train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["loss"]) for line in lines) and "koleo_loss" not in lines[0]


def test_final_knn_and_saved_backbone_use_the_evaluation_size(tmp_path, monkeypatch):
    """`eval_image_size` 32 on a 16 px run: the final k-NN runs at 32 px and the saved backbone takes 32 px."""
    import hf_dino.evaluation.knn as knn_module

    crop_sizes = []

    def fake_knn(model, train_split, val_split, *, crop_size, **kwargs):
        crop_sizes.append(crop_size)
        return {"top1": 50.0, "top5": 90.0, "k": 20, "temperature": 0.07, "num_train": 1, "num_val": 1}

    monkeypatch.setattr(knn_module, "knn_evaluate_splits", fake_knn)
    DinoTrainer(tiny_recipe(tmp_path, knn_eval_at_end=True, epochs=1, eval_image_size=32)).train()
    assert crop_sizes == [32]
    backbone = AutoModel.from_pretrained(tmp_path / "teacher_backbone")
    assert backbone.config.image_size == 32 and backbone.embeddings.position_embeddings.shape[1] == 1 + (32 // 4) ** 2
    assert "on frozen features at 32 px" in (tmp_path / "teacher_backbone" / "README.md").read_text()


# ---------------------------------------------------------------------------- the shipped recipe at its edges
def demo_recipe(output_dir, *flags: str) -> DinoRecipe:
    """The default (packaged demo) recipe with data-size flags only."""
    from hf_dino.recipe import parse_recipe

    return parse_recipe(["--config", "demo_cifar10_cpu", "--output_dir", str(output_dir), "--num_workers", "0",
                         "--logging_steps", "1", *flags])


def png_bytes(level: int, size: int = 20) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), level % 256, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_parquet_split(path, cells: list[dict]) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"image": cells, "label": [i % 2 for i in range(len(cells))]},
                               features=features).to_parquet(str(path))


@pytest.mark.parametrize("extra", [[], ["--teacher_centering", "sinkhorn_knopp"]], ids=["shipped", "sinkhorn"])
def test_default_recipe_trains_through_batches_of_0_1_and_2_decodable_images(tmp_path, extra):
    """The shipped recipe (batch-norm head, KoLeo) on a stream (stream order) whose batches of 4 hold
    0, 1, 2 and 4 decodable images: the first is skipped, the others train (a single image's KoLeo
    term is 0) with finite losses."""
    bad = {"bytes": b"not an image", "path": None}
    good = [{"bytes": png_bytes(30 * i), "path": None} for i in range(7)]
    write_parquet_split(tmp_path / "data" / "train.parquet",
                        [bad] * 4 + good[:1] + [bad] * 3 + good[1:3] + [bad] * 2 + good[3:])
    recipe = demo_recipe(tmp_path / "run", "--dataset_name", str(tmp_path / "data"), "--streaming", "true",
                         "--shuffle_buffer_size", "1", "--max_train_samples", "16", "--batch_size_per_device", "4",
                         "--epochs", "2", "--warmup_epochs", "0", "--knn_eval_at_end", "false", *extra)
    results = DinoTrainer(recipe).train()
    assert results["global_step"] == 6 and results["num_skipped_batches"] == 2
    assert results["num_skipped_images"] == 18 and results["images_per_process"] == [14]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["loss"]) and math.isfinite(line["koleo_loss"]) for line in lines)
    assert lines[0]["koleo_loss"] == 0.0 and lines[1]["koleo_loss"] > 0  # one image: no neighbour


@pytest.mark.parametrize("layout", ["image_folder", "streamed_parquet"])
def test_a_decompression_bomb_is_skipped_from_its_header_and_counted(tmp_path, layout, caplog):
    """7 images and one 12000 x 12000 PNG (144 MP, a few kB; decoded it would take 432 MB as RGB)
    under the shipped recipe's 100 MP budget: skipped and counted in each epoch, named in the log."""
    import logging

    from test_data import png_bomb

    images = [png_bytes(30 * i) for i in range(7)] + [png_bomb(12000, 12000)]
    if layout == "image_folder":
        (tmp_path / "data").mkdir()
        for index, data in enumerate(images):
            (tmp_path / "data" / f"{index}.png").write_bytes(data)
        flags = []
    else:
        write_parquet_split(tmp_path / "data" / "train.parquet", [{"bytes": d, "path": None} for d in images])
        flags = ["--streaming", "true", "--max_train_samples", "8"]
    recipe = demo_recipe(tmp_path / "run", "--dataset_name", str(tmp_path / "data"), "--batch_size_per_device", "4",
                         "--epochs", "2", "--warmup_epochs", "0", "--knn_eval_at_end", "false", *flags)
    with caplog.at_level(logging.WARNING):
        results = DinoTrainer(recipe).train()
    assert results["num_skipped_images"] == 2 and results["images_per_process"] == [14]
    assert "12000x12000 pixels, above max_image_pixels=100000000" in caplog.text


def test_a_streamed_run_resumes_bitwise_from_its_checkpoint_without_decoding_what_it_trained_on(tmp_path, decoded):
    """The shipped recipe, streamed train + test parquet files (2 shards), checkpoints every 2 steps:
    resumed from checkpoint-2 (mid-epoch), the run ends with the uninterrupted run's teacher and
    centre bit for bit, decodes exactly the images the uninterrupted run decoded after step 2 (those
    of the later batches, then the k-NN's), and its final k-NN streams the held-out split."""
    from safetensors.torch import load_file

    for shard in range(2):
        write_parquet_split(tmp_path / "data" / f"train-{shard:05d}-of-00002.parquet",
                            [{"bytes": png_bytes(7 * (12 * shard + i)), "path": None} for i in range(12)])
    write_parquet_split(tmp_path / "data" / "test.parquet", [{"bytes": png_bytes(3 * i + 1), "path": None}
                                                             for i in range(10)])
    flags = ["--dataset_name", str(tmp_path / "data"), "--streaming", "true", "--max_train_samples", "24",
             "--batch_size_per_device", "4", "--shuffle_buffer_size", "5", "--epochs", "2", "--warmup_epochs", "0",
             "--checkpointing_steps", "2"]
    uninterrupted = DinoTrainer(demo_recipe(tmp_path / "full", *flags)).train()
    decoded_uninterrupted, decoded[:] = list(decoded), []
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = DinoTrainer(demo_recipe(tmp_path / "resumed", *flags, "--resume_from_checkpoint",
                                      str(tmp_path / "resumed" / "checkpoint-2"))).train()
    assert uninterrupted["global_step"] == resumed["global_step"] == 12
    for name in ("teacher.safetensors", "dino_loss.safetensors"):
        expected, again = (load_file(str(tmp_path / run / "checkpoint-12" / name)) for run in ("full", "resumed"))
        assert all(torch.equal(expected[key], again[key]) for key in expected), name
    assert decoded == decoded_uninterrupted[2 * 4:]  # workers in the main process: decodes in training order
    assert uninterrupted["knn"] == resumed["knn"] and uninterrupted["knn"]["num_val"] == 10
