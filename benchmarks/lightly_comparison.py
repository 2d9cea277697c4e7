#!/usr/bin/env python
"""hf_dino next to lightly's DINO at equal training: the same images, backbone, epochs and crops.

lightly (https://github.com/lightly-ai/lightly) is the library hf_dino's users would otherwise
pick. Its DINO is assembled from `DINOProjectionHead`, `DINOLoss`, `DINOTransform` and
`update_momentum` in a training loop written as its DINO example writes it (each view through
the student separately, the momentum update at the start of the step); hf_dino's is
`DinoTrainer`, the library's own loop. Both get the same hyper-parameters from one hf_dino recipe
(`--config`, the CPU demo's by default): backbone module (built by hf_dino: a transformers
`ViTModel` or the CIFAR-stem `CifarResNetModel`), head sizes, batch norm in the head, K,
temperatures, centre momentum, teacher-momentum schedule, AdamW with the same lr warm-up + cosine
and weight-decay schedules (no decay on biases and norms), per-parameter gradient clipping,
frozen-last-layer epochs, crop sizes, scales and numbers, colour jitter, blur, solarisation;
batch size and data-loading workers. Each run trains `--epochs` epochs on the 10,000 demo
images from scratch, then its teacher backbone is scored with the same 20-NN (T 0.07, CLS /
pooled feature, whole 32 px images) on held-out CIFAR-10 test images (`demo_knn.py`'s `test`
split: bank = the 10,000 training images). images/s = images trained / the training loop's
wall time (data loading included, evaluation excluded).

It needs torchvision and lightly beside hf_dino (torchvision cannot be imported beside
torch 2.13.0+cpu; torch 2.14.1 + torchvision 0.29.1 work):

    python -m venv ../lightly_env && ../lightly_env/bin/pip install torch==2.14.1 torchvision==0.29.1 lightly
    ../lightly_env/bin/pip install -e .
    ../lightly_env/bin/python -m benchmarks.lightly_comparison --cifar10_dir ../shared/data/cifar10 \\
        --variants demo_vit cifar_resnet --seeds 0 1 2 --epochs 1 --warmup_steps 30 --resnet_width 16 \\
        --output_json lightly_comparison.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import machine_description

# Each variant: overrides of the recipe's architecture fields.
VARIANTS = {
    "demo_vit": {},  # the demo's backbone as its recipe says
    "cifar_resnet": {"arch": "resnet18", "resnet_stem": "cifar", "num_hidden_layers": None, "hidden_size": None,
                     "num_attention_heads": None},
}


def variant_recipe(config: str, variant: str, seed: int, epochs: int, resnet_width: int | None, output_dir: Path,
                   max_steps: int | None = None, warmup_steps: int | None = None):
    """The recipe both libraries train with."""
    import dataclasses

    from hf_dino.recipe import parse_recipe

    recipe = parse_recipe(["--config", config])
    values = dict(VARIANTS[variant])
    if variant == "cifar_resnet" and resnet_width:
        values["hidden_size"] = resnet_width
    if warmup_steps is not None:
        values["warmup_steps"] = warmup_steps
    values.update(seed=seed, epochs=epochs, max_steps=max_steps, output_dir=str(output_dir), eval_every=None,
                  knn_eval_at_end=False, report_to=None, push_to_hub=False, checkpointing_steps=None)
    recipe = dataclasses.replace(recipe, **values)
    recipe.validate()
    return recipe


def train_hf_dino(recipe) -> tuple[torch.nn.Module, float, int]:
    """(teacher backbone, training seconds, images trained) of hf_dino's trainer."""
    from hf_dino.evaluation import load_frozen_backbone
    from hf_dino.trainer import DinoTrainer

    results = DinoTrainer(recipe).train()
    model, _ = load_frozen_backbone(str(Path(recipe.output_dir) / "teacher_backbone"))
    return model, results["train_time_s"], sum(results["images_per_process"])


class DemoImages(torch.utils.data.Dataset):
    """The demo's training images as PIL images through a lightly transform."""

    def __init__(self, path: Path, transform):
        from datasets import load_dataset

        self.images = load_dataset("parquet", data_files=str(path), split="train")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]["image"].convert("RGB"))


class LightlyDino(torch.nn.Module):
    """Backbone + lightly's `DINOProjectionHead`, as lightly's DINO example builds it."""

    def __init__(self, backbone: torch.nn.Module, recipe, feature_dim: int):
        from lightly.models.modules import DINOProjectionHead

        super().__init__()
        self.backbone = backbone
        self.head = DINOProjectionHead(feature_dim, recipe.head_hidden_dim, recipe.head_bottleneck_dim, recipe.out_dim,
                                       batch_norm=recipe.use_bn_in_head, freeze_last_layer=recipe.freeze_last_layer,
                                       norm_last_layer=recipe.norm_last_layer)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from hf_dino.evaluation.features import backbone_cls_features

        return self.head(backbone_cls_features(self.backbone, pixel_values))


def train_lightly(recipe) -> tuple[torch.nn.Module, float, int]:
    """(teacher backbone, training seconds, images trained) of lightly's DINO on the recipe."""
    from lightly.loss import DINOLoss
    from lightly.models.utils import update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule

    from hf_dino.data import DEMO_DATASET_DIR
    from hf_dino.modeling_dino import DinoModel
    from hf_dino.optimization import clip_gradients_per_parameter
    from hf_dino.student_teacher import build_dino_config

    torch.manual_seed(recipe.seed)
    dino_config = build_dino_config(recipe, 0.0)
    backbone = DinoModel(dino_config).backbone  # built first, so from the same seeded stream as hf_dino's
    if dino_config.backbone_config.model_type == "vit":  # as hf_dino's `build_student_and_teacher`
        from hf_dino.student_teacher import initialize_vit_backbone_

        initialize_vit_backbone_(backbone, recipe)
    feature_dim = dino_config.backbone_feature_dim
    student = LightlyDino(backbone, recipe, feature_dim)
    # As lightly's DINO example: the teacher's head is built anew (its weight-normalised last layer cannot
    # be deep-copied); here it then takes the student's weights, so both start equal as in the paper.
    teacher = LightlyDino(copy.deepcopy(backbone), recipe, feature_dim)
    teacher.head.load_state_dict(student.head.state_dict())
    teacher.requires_grad_(False)
    brightness, contrast, saturation, hue = recipe.color_jitter
    transform = DINOTransform(
        global_crop_size=recipe.global_crop_size, global_crop_scale=tuple(recipe.global_crops_scale),
        local_crop_size=recipe.local_crop_size, local_crop_scale=tuple(recipe.local_crops_scale),
        n_local_views=recipe.local_crops_number, cj_prob=recipe.color_jitter_prob, cj_strength=1.0,
        cj_bright=brightness, cj_contrast=contrast, cj_sat=saturation, cj_hue=hue,
        random_gray_scale=recipe.grayscale_prob, gaussian_blur=tuple(recipe.blur_probs),
        sigmas=tuple(recipe.blur_sigma), solarization_prob=recipe.solarize_prob)
    generator = torch.Generator().manual_seed(recipe.seed)
    loader = torch.utils.data.DataLoader(
        DemoImages(DEMO_DATASET_DIR / "train.parquet", transform), batch_size=recipe.batch_size_per_device,
        shuffle=True, drop_last=True, num_workers=recipe.num_workers, generator=generator,
        persistent_workers=recipe.num_workers > 0)
    criterion = DINOLoss(output_dim=recipe.out_dim, warmup_teacher_temp=recipe.warmup_teacher_temp,
                         teacher_temp=recipe.teacher_temp, warmup_teacher_temp_epochs=recipe.warmup_teacher_temp_epochs,
                         student_temp=recipe.student_temp, center_momentum=recipe.center_momentum)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim > 1]},
                                   {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}])
    steps_per_epoch = len(loader)
    total_steps = recipe.max_steps or recipe.epochs * steps_per_epoch
    warmup_steps = recipe.warmup_steps if recipe.warmup_steps is not None else recipe.warmup_epochs * steps_per_epoch
    base_lr = recipe.lr * recipe.batch_size_per_device / 256
    student.train()
    teacher.train()
    step, images, start = 0, 0, time.perf_counter()
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        for views in itertools.islice(loader, total_steps - step):
            momentum = cosine_schedule(step, total_steps, recipe.momentum_teacher, recipe.momentum_teacher_end)
            update_momentum(student, teacher, m=momentum)
            lr = (base_lr * (step + 1) / warmup_steps if step < warmup_steps else
                  cosine_schedule(step - warmup_steps, total_steps - warmup_steps, base_lr, recipe.min_lr))
            optimizer.param_groups[0].update(lr=lr, weight_decay=cosine_schedule(
                step, total_steps, recipe.weight_decay, recipe.weight_decay_end))
            optimizer.param_groups[1].update(lr=lr)
            with torch.no_grad():
                teacher_out = [teacher(view) for view in views[:2]]
            student_out = [student(view) for view in views]
            loss = criterion(teacher_out, student_out, epoch=epoch)
            loss.backward()
            if recipe.clip_grad > 0:
                clip_gradients_per_parameter(trainable, recipe.clip_grad)
            student.head.cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"lightly's loss is {loss.item()} at step {step}")
            step += 1
            images += views[0].shape[0]
    return teacher.backbone.eval(), time.perf_counter() - start, images


def knn_top1(model: torch.nn.Module, bank, queries) -> float:
    from hf_dino.evaluation import knn_evaluate_splits

    result = knn_evaluate_splits(model.eval(), bank, queries, crop_size=32, ks=(20,), temperature=0.07,
                                 resize_ratio=1.0)
    return result["top1"]


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar10_dir", type=Path, required=True, help="folder with CIFAR-10 train.parquet, test.parquet")
    parser.add_argument("--config", default="demo_cifar10_cpu", help="hf_dino recipe both libraries train with")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--libraries", nargs="+", default=["hf_dino", "lightly"], choices=["hf_dino", "lightly"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of every run")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="learning-rate warm-up of every run in steps (unset: the recipe's, one epoch for the demo's)")
    parser.add_argument("--max_steps", type=int, default=None, help="stop every run after this many steps (smoke tests)")
    parser.add_argument("--resnet_width", type=int, default=None,
                        help="cifar_resnet's first-stage width (ResNet-18: 64; unset: the recipe's hidden_size or 64)")
    parser.add_argument("--work_dir", type=Path, default=None, help="run folders and query sets (default: a temporary one)")
    parser.add_argument("--output_json", type=Path)
    args = parser.parse_args()

    import logging

    import datasets
    import lightly
    from datasets import load_dataset

    from benchmarks.demo_knn import held_out_queries

    from hf_dino.data import DEMO_DATASET_DIR

    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="lightly_comparison_"))
    queries = held_out_queries(args.cifar10_dir, work_dir / "queries")
    bank = load_dataset("parquet", data_files=str(DEMO_DATASET_DIR / "train.parquet"), split="train")
    test = load_dataset("parquet", data_files=str(queries["test"]), split="train")
    machine = machine_description()
    print(f"machine: {machine}; lightly {lightly.__version__}")
    runs = []
    for variant in args.variants:
        for seed in args.seeds:
            for library in args.libraries:
                recipe = variant_recipe(args.config, variant, seed, args.epochs, args.resnet_width,
                                        work_dir / f"{variant}_{library}_{seed}", args.max_steps,
                                        args.warmup_steps)
                wall = time.perf_counter()
                model, seconds, images = (train_hf_dino if library == "hf_dino" else train_lightly)(recipe)
                top1 = knn_top1(model, bank, test)
                run = {"variant": variant, "library": library, "seed": seed, "epochs": args.epochs,
                       "images": images, "train_s": round(seconds, 1), "img_per_s": round(images / seconds, 2),
                       "knn_top1": round(top1, 2), "wall_s": round(time.perf_counter() - wall, 1)}
                runs.append(run)
                print(json.dumps(run), flush=True)
    print("\n| variant | library | 20-NN top-1 (test) | images/s | runs |\n| --- | --- | --- | --- | --- |")
    for variant in args.variants:
        for library in args.libraries:
            mine = [run for run in runs if run["variant"] == variant and run["library"] == library]
            print(f"| {variant} | {library} | {mean_sd([r['knn_top1'] for r in mine])} | "
                  f"{mean_sd([r['img_per_s'] for r in mine])} | {len(mine)} |")
    if args.output_json:
        args.output_json.write_text(json.dumps({"machine": machine, "lightly": lightly.__version__, "runs": runs},
                                               indent=2) + "\n")


if __name__ == "__main__":
    main()
