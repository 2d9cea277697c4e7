#!/usr/bin/env python
"""hf_dino next to lightly's DINO at equal training: the same images, recipe, initial weights and evaluation.

lightly (https://github.com/lightly-ai/lightly) is the library hf_dino's users would otherwise
pick. Its DINO is assembled from `DINOProjectionHead`, `DINOLoss`, `KoLeoLoss`, `DINOTransform`
and `update_momentum` in a training loop written as its DINO example writes it (each view through
the student separately, the momentum update at the start of the step); hf_dino's is `DinoTrainer`,
the library's own loop. Both get every hyper-parameter from one hf_dino recipe (`--config`, the CPU
demo's by default, trained as it ships: its epochs, warm-up and evaluation size unless overridden):
backbone module (built by hf_dino: a transformers `ViTModel` or the CIFAR-stem `CifarResNetModel`),
head sizes, batch norm in the head, K, temperatures, centre momentum, teacher-momentum schedule,
KoLeo weight, AdamW with the same lr warm-up + cosine and weight-decay schedules (no decay on biases
and norms), per-parameter gradient clipping, frozen-last-layer epochs, crop sizes, scales and
numbers, colour jitter, blur, solarisation; batch size and data-loading workers.

Both start from the same weights: lightly's student and teacher (backbone and head) are loaded
with the initial student that hf_dino's `build_student_and_teacher` draws for the seed after
`set_seed(seed)`, as `DinoTrainer` does (for the demo ViT: the recipe's sine-cosine position
embeddings and mimetic attention). The JSON records a checksum of each library's initial backbone.

Each run trains on the 10,000 demo images from scratch; its teacher backbone is exported as
hf_dino saves one (a ViT's position embeddings resampled to the recipe's `eval_image_size`) and
scored with the same 20-NN (T 0.07, CLS / pooled feature, whole 32 px images resized to that size)
on held-out CIFAR-10 test images (`demo_knn.py`'s `test` split: bank = the 10,000 training images),
and at 32 px as well. images/s = images trained / the training loop's wall time (data loading
included, evaluation excluded).

It needs torchvision and lightly beside hf_dino (torchvision cannot be imported beside
torch 2.13.0+cpu; torch 2.14.1 + torchvision 0.29.1 work):

    python -m venv ../lightly_env && ../lightly_env/bin/pip install torch==2.14.1 torchvision==0.29.1 lightly
    ../lightly_env/bin/pip install -e .
    ../lightly_env/bin/python -m benchmarks.lightly_comparison --cifar10_dir CIFAR10_DIR \\
        --variants demo_vit --seeds 0 1 2 --num_threads 1 --output_json docs/lightly_comparison.json

(`--num_threads 1`: on a machine shared with other jobs, two torch threads per process oversubscribe
the cores and every run slows down many times; on a quiet machine leave it out to time both libraries
at full speed.)
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


def variant_recipe(config: str, variant: str, seed: int, epochs: int | None, resnet_width: int | None,
                   output_dir: Path, max_steps: int | None = None, warmup_steps: int | None = None,
                   num_threads: int | None = None):
    """The recipe both libraries train with: `config` as it ships, the variant's architecture, and only the
    overrides given (`epochs` / `warmup_steps` / `max_steps` None: the recipe's own)."""
    import dataclasses

    from hf_dino.recipe import parse_recipe

    recipe = parse_recipe(["--config", config])
    values = dict(VARIANTS[variant])
    if variant == "cifar_resnet" and resnet_width:
        values["hidden_size"] = resnet_width
    if warmup_steps is not None:
        values["warmup_steps"] = warmup_steps
    if epochs is not None:
        values["epochs"] = epochs
    if num_threads is not None:
        values["num_threads"] = num_threads
    values.update(seed=seed, max_steps=max_steps, output_dir=str(output_dir), eval_every=None,
                  knn_eval_at_end=False, report_to=None, push_to_hub=False, checkpointing_steps=None)
    recipe = dataclasses.replace(recipe, **values)
    recipe.validate()
    return recipe


def checksum(module: torch.nn.Module) -> str:
    """SHA-1 of a module's parameters and buffers (names and values, float32): equal weights, equal sums."""
    import hashlib

    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def initial_student(recipe):
    """The student hf_dino's trainer starts from: `build_student_and_teacher` right after `set_seed`."""
    from accelerate.utils import set_seed

    from hf_dino.student_teacher import build_student_and_teacher

    set_seed(recipe.seed)
    student, _ = build_student_and_teacher(recipe)
    return student


def train_hf_dino(recipe) -> tuple[torch.nn.Module, float, int, str | None]:
    """(teacher backbone as saved, training seconds, images trained, checksum of the initial backbone)
    of hf_dino's trainer. The checksum is taken from the student the trainer itself builds."""
    import hf_dino.trainer as trainer_module
    from hf_dino.evaluation import load_frozen_backbone

    built = {}
    build = getattr(trainer_module, "build_student_and_teacher", None)
    if build is not None:  # record what the trainer starts from, without changing it
        def recording_build(*args, **kwargs):
            student, teacher = build(*args, **kwargs)
            built["backbone"] = checksum(student.backbone)
            return student, teacher

        trainer_module.build_student_and_teacher = recording_build
    try:
        results = trainer_module.DinoTrainer(recipe).train()
    finally:
        if build is not None:
            trainer_module.build_student_and_teacher = build
    model, _ = load_frozen_backbone(str(Path(recipe.output_dir) / "teacher_backbone"))
    return model, results["train_time_s"], sum(results["images_per_process"]), built.get("backbone")


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

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(backbone features, head logits) of one view."""
        from hf_dino.evaluation.features import backbone_cls_features

        features = backbone_cls_features(self.backbone, pixel_values)
        return features, self.head(features)


def load_hf_dino_head_(head: torch.nn.Module, hf_dino_head: torch.nn.Module) -> None:
    """Give lightly's `DINOProjectionHead` the weights of hf_dino's `DinoHead`: the MLP's linear and
    batch-norm layers in order (lightly's linear layers before a batch norm have no bias; hf_dino's
    are zero at initialisation and cancelled by the batch norm), then the last layer's g and v."""
    mine = [m for m in head.layers.modules() if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))]
    theirs = [m for m in hf_dino_head.mlp.modules() if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))]
    if [type(m) for m in mine] != [type(m) for m in theirs]:
        raise ValueError("lightly's and hf_dino's heads differ in structure")
    with torch.no_grad():
        for target, source in zip(mine, theirs):
            for name, tensor in source.state_dict().items():
                if name in target.state_dict():
                    target.state_dict()[name].copy_(tensor)
                elif name == "bias" and tensor.abs().max() > 0:
                    raise ValueError("hf_dino's head has a non-zero bias where lightly's has none")
        head.last_layer.weight_g.copy_(hf_dino_head.last_layer.parametrizations.weight.original0)
        head.last_layer.weight_v.copy_(hf_dino_head.last_layer.parametrizations.weight.original1)


def train_lightly(recipe) -> tuple[torch.nn.Module, float, int, str]:
    """(teacher backbone, training seconds, images trained, checksum of the initial backbone) of
    lightly's DINO on the recipe, starting from hf_dino's initial student (`initial_student`)."""
    from lightly.loss import DINOLoss, KoLeoLoss
    from lightly.models.utils import update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule

    from hf_dino.data import DEMO_DATASET_DIR
    from hf_dino.optimization import clip_gradients_per_parameter

    start_model = initial_student(recipe)  # backbone (sincos / mimetic for the demo ViT) and head
    backbone = start_model.backbone
    initial_checksum = checksum(backbone)
    feature_dim = start_model.config.backbone_feature_dim
    student = LightlyDino(backbone, recipe, feature_dim)
    load_hf_dino_head_(student.head, start_model.head)
    # As lightly's DINO example: the teacher's head is built anew (its weight-normalised last layer cannot
    # be deep-copied); here it then takes the student's weights, so both start equal as in the paper.
    teacher = LightlyDino(copy.deepcopy(backbone), recipe, feature_dim)
    teacher.head.load_state_dict(student.head.state_dict())
    teacher.requires_grad_(False)
    torch.manual_seed(recipe.seed)
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
    koleo = KoLeoLoss()  # DINOv2's, on each global crop's student backbone features, as hf_dino applies it
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
                teacher_out = [teacher(view)[1] for view in views[:2]]
            student_features, student_out = zip(*(student(view) for view in views))
            loss = criterion(teacher_out, list(student_out), epoch=epoch)
            if recipe.koleo_loss_weight > 0:
                loss = loss + recipe.koleo_loss_weight * torch.stack(
                    [koleo(features) for features in student_features[:2]]).mean()
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
    return teacher.backbone.eval(), time.perf_counter() - start, images, initial_checksum


def exported_backbone(backbone: torch.nn.Module, recipe) -> torch.nn.Module:
    """The backbone as hf_dino saves a teacher: a ViT takes `recipe.evaluation_image_size` px natively."""
    from transformers import ViTModel

    from hf_dino.hub import exportable_vit

    if isinstance(backbone, ViTModel):
        return exportable_vit(backbone, recipe.evaluation_image_size).eval()
    return backbone


def knn_top1(model: torch.nn.Module, bank, queries, image_size: int) -> float:
    """20-NN top-1 (T 0.07) of whole images resized to `image_size` px."""
    from hf_dino.evaluation import knn_evaluate_splits

    result = knn_evaluate_splits(model.eval(), bank, queries, crop_size=image_size, ks=(20,), temperature=0.07,
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
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of every run (unset: the recipe's)")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="learning-rate warm-up of every run in steps (unset: the recipe's warmup_epochs)")
    parser.add_argument("--max_steps", type=int, default=None, help="stop every run after this many steps (smoke tests)")
    parser.add_argument("--resnet_width", type=int, default=None,
                        help="cifar_resnet's first-stage width (ResNet-18: 64; unset: the recipe's hidden_size or 64)")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch threads of both libraries' training and of the k-NN (unset: the recipe's, "
                             "else all cores); 1 keeps a shared machine from oversubscribing")
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
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
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
                                        args.warmup_steps, args.num_threads)
                wall = time.perf_counter()
                model, seconds, images, initial = (train_hf_dino if library == "hf_dino" else train_lightly)(recipe)
                model = exported_backbone(model, recipe)  # hf_dino's is loaded as saved: already exported
                size = recipe.evaluation_image_size
                top1 = knn_top1(model, bank, test, size)
                top1_32 = knn_top1(model, bank, test, 32)
                run = {"variant": variant, "library": library, "seed": seed, "epochs": recipe.epochs,
                       "warmup_steps": recipe.warmup_steps, "warmup_epochs": recipe.warmup_epochs,
                       "koleo_loss_weight": recipe.koleo_loss_weight, "initial_backbone_sha1": initial,
                       "torch_threads": torch.get_num_threads(),
                       "images": images, "train_s": round(seconds, 1), "img_per_s": round(images / seconds, 2),
                       "eval_image_size": size, "knn_top1": round(top1, 2), "knn_top1_32px": round(top1_32, 2),
                       "wall_s": round(time.perf_counter() - wall, 1)}
                runs.append(run)
                print(json.dumps(run), flush=True)
    print("\n| variant | library | 20-NN top-1 (test) | at 32 px | images/s | runs |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for variant in args.variants:
        for library in args.libraries:
            mine = [run for run in runs if run["variant"] == variant and run["library"] == library]
            print(f"| {variant} | {library} | {mean_sd([r['knn_top1'] for r in mine])} | "
                  f"{mean_sd([r['knn_top1_32px'] for r in mine])} | {mean_sd([r['img_per_s'] for r in mine])} | "
                  f"{len(mine)} |")
    paired = {}
    if set(args.libraries) == {"hf_dino", "lightly"}:
        for variant in args.variants:
            by_seed = {(r["library"], r["seed"]): r for r in runs if r["variant"] == variant}
            differences = [by_seed["hf_dino", seed]["knn_top1"] - by_seed["lightly", seed]["knn_top1"]
                           for seed in args.seeds]
            same_start = all(by_seed["hf_dino", seed]["initial_backbone_sha1"]
                             == by_seed["lightly", seed]["initial_backbone_sha1"] for seed in args.seeds)
            paired[variant] = {"hf_dino_minus_lightly": [round(d, 2) for d in differences],
                               "mean_sd": mean_sd(differences), "same_initial_backbone": same_start}
            print(f"{variant}: hf_dino - lightly per seed {paired[variant]['hf_dino_minus_lightly']}, "
                  f"{paired[variant]['mean_sd']}; same initial backbone on every seed: {same_start}")
    if args.output_json:
        args.output_json.write_text(json.dumps({"machine": machine, "lightly": lightly.__version__,
                                                "config": args.config, "runs": runs, "paired": paired},
                                               indent=2) + "\n")


if __name__ == "__main__":
    main()
