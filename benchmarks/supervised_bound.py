#!/usr/bin/env python
"""What the demo's backbone can reach WITH labels: an upper reference for issue 18's k-NN target.

The CPU demo's self-supervised teacher is scored by a 20-NN on held-out CIFAR-10 images
(`benchmarks/demo_knn.py`). This script trains the same backbone (built from the same recipe,
`--config`, the demo's by default) *supervised*: a linear classifier on the CLS token (the
feature the k-NN reads), cross-entropy on the 10,000 demo images and their labels, AdamW with a
one-cycle learning rate, reflect-pad-4 random 32 px crops and horizontal flips, batch 64 as the
demo. After each budget in `--epochs` (each trained from scratch) it prints the same 20-NN as
demo_knn.py (k 20, T 0.07, CLS, whole 32 px images, bank = the 10,000 demo images, queries =
`--splits`), the classifier's own top-1 on those queries, and the training wall time, next to raw
pixels in the same run. If labels do not lift this backbone's k-NN above raw pixels within a
budget, self-supervision within that budget will not either.

    python -m benchmarks.supervised_bound --cifar10_dir ../shared/data/cifar10 --epochs 4 16 40 \\
        --seeds 0 1 2 --splits val test --output_json supervised_bound.json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from benchmarks import machine_description
from benchmarks.demo_knn import DEMO_DATA, held_out_queries


def decode_images(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A parquet of 32 px images -> ((N, 3, 32, 32) float normalised as hf_dino's evaluation, (N,) labels)."""
    from hf_dino.transforms import IMAGENET_MEAN, IMAGENET_STD

    table = pq.read_table(path, columns=["image", "label"])
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(image["bytes"])).convert("RGB"))
                       for image in table.column("image").to_pylist()])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std, torch.tensor(table.column("label").to_pylist())


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W): a random H x W crop of the reflect-padded image, flipped with p 0.5."""
    batch, _, height, width = images.shape
    padded = nn.functional.pad(images, (padding,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    out = torch.empty_like(images)
    for index, (dy, dx) in enumerate(offsets.tolist()):
        crop = padded[index, :, dy:dy + height, dx:dx + width]
        out[index] = crop.flip(-1) if flips[index] else crop
    return out


class CLSClassifier(nn.Module):
    """A backbone with a linear classifier on its CLS feature (`backbone_cls_features`)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int = 10):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from hf_dino.evaluation.features import backbone_cls_features

        return self.classifier(backbone_cls_features(self.backbone, pixel_values))


def train_supervised(recipe, images: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
                     weight_decay: float, seed: int) -> tuple[nn.Module, float]:
    """Train recipe's backbone + a linear CLS classifier with labels; returns (model, seconds)."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    config = recipe.backbone_config()
    backbone = AutoModel.from_config(config, add_pooling_layer=False) if config.model_type == "vit" \
        else AutoModel.from_config(config)
    if config.model_type == "vit":  # as the recipe's DINO backbone starts
        from hf_dino.student_teacher import initialize_vit_backbone_

        initialize_vit_backbone_(backbone, dataclasses.replace(recipe, seed=seed))
    feature_dim = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]
    model = CLSClassifier(backbone, feature_dim)
    batch_size = recipe.batch_size_per_device
    steps_per_epoch = len(images) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size:(step + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(augment(images[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    seconds = time.perf_counter() - start
    return model.eval(), seconds


@torch.no_grad()
def classifier_top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([model(chunk).argmax(-1) for chunk in images.split(500)])
    return 100.0 * (predictions == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar10_dir", type=Path, required=True, help="folder with CIFAR-10 train.parquet, test.parquet")
    parser.add_argument("--config", default="demo_cifar10_cpu", help="recipe whose backbone is trained")
    parser.add_argument("--epochs", nargs="+", type=int, default=[4], help="budgets, each trained from scratch")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (one-cycle)")
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--splits", nargs="+", default=["val"], choices=["val", "test"], help="query sets")
    parser.add_argument("--work_dir", type=Path, default=Path("demo_knn_queries"), help="where the query sets go")
    parser.add_argument("--output_json", type=Path)
    args = parser.parse_args()

    from datasets import load_dataset

    from hf_dino.evaluation import RawPixels, knn_evaluate_splits
    from hf_dino.recipe import DinoRecipe, resolve_config

    recipe = DinoRecipe.from_yaml(resolve_config(args.config))
    queries = held_out_queries(args.cifar10_dir, args.work_dir)
    bank = load_dataset("parquet", data_files=str(DEMO_DATA / "train.parquet"), split="train")
    query_splits = {split: load_dataset("parquet", data_files=str(queries[split]), split="train")
                    for split in args.splits}
    query_tensors = {split: decode_images(queries[split]) for split in args.splits}
    images, labels = decode_images(DEMO_DATA / "train.parquet")

    def knn(model: nn.Module, split: str) -> float:
        return knn_evaluate_splits(model, bank, query_splits[split], crop_size=recipe.global_crop_size, ks=(20,),
                                   temperature=0.07, resize_ratio=1.0, feature="cls")["top1"]

    results = {"machine": machine_description(),
               "raw_pixels": {split: round(knn(RawPixels(), split), 2) for split in args.splits}, "runs": []}
    print(f"machine: {results['machine']}")
    print(f"raw pixels 20-NN: {results['raw_pixels']}")
    for epochs in args.epochs:
        for seed in args.seeds:
            model, seconds = train_supervised(recipe, images, labels, epochs, args.lr, args.weight_decay, seed)
            run = {"epochs": epochs, "steps": epochs * (len(images) // recipe.batch_size_per_device), "seed": seed,
                   "train_seconds": round(seconds, 1)}
            for split in args.splits:
                run[f"{split}_knn20"] = round(knn(model.backbone, split), 2)
                run[f"{split}_classifier"] = round(classifier_top1(model, *query_tensors[split]), 2)
            results["runs"].append(run)
            print(json.dumps(run))
    for epochs in args.epochs:
        runs = [run for run in results["runs"] if run["epochs"] == epochs]
        for key in [key for key in runs[0] if key.endswith(("_knn20", "_classifier"))]:
            values = [run[key] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{epochs} epochs, {key}: {statistics.mean(values):.2f} ± {spread:.2f} over {len(values)} seeds")
    if args.output_json:
        args.output_json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
