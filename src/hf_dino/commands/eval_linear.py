"""Linear probe of a frozen backbone (Caron et al. 2021, Sec. 4.1; the reference's eval_linear).

    python scripts/eval_linear.py --model OUTPUT_DIR/teacher_backbone --dataset_name DATA \\
        [--epochs 100 --batch_size 256 --lr 0.001 0.01 0.1 --n_last_blocks 4 --avgpool_patchtokens false]

A linear layer on the frozen features (the CLS tokens of the last n blocks, optionally with the
mean patch token) is trained with SGD + cosine schedule; several learning rates train in one
pass and the best is reported. Prints and writes {"top1", "top5", "best_top1", "lr", ...}.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..cli import DataArguments, emit_json, load_evaluation_splits, model_field, parse_args
from .model_loading import default_device, load_model_or_exit
from ..data import LabelledImageDataset, collate_labelled
from ..evaluation.linear import LinearProbeConfig, class_names, save_image_classifier, train_linear_probe
from ..transforms import evaluation_transform, linear_probe_train_transform
from .eval_knn import EvaluationImageArguments


@dataclass
class LinearProbeArguments:
    model: str = model_field()
    epochs: int = field(default=100, metadata={"help": "training epochs of the linear layer"})
    batch_size: int = field(default=256, metadata={"help": "images per step"})
    lr: list[float] = field(default_factory=lambda: [0.001], metadata={
        "help": "base learning rate(s) at batch 256 (scaled by batch/256); several train in one pass, the best is "
                "reported", "aliases": ["--learning_rate"]})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay"})
    n_last_blocks: int | None = field(default=None, metadata={
        "help": "concatenate the CLS tokens of the last n blocks; unset: 4 below ViT-B width, else 1"})
    avgpool_patchtokens: bool | None = field(default=None, metadata={
        "help": "append the mean patch token of the last block; unset: true from ViT-B width"})
    augmentation: bool = field(default=True, metadata={
        "help": "random-resized-crop + flip training images; --no_augmentation trains on centre crops whose "
                "features are extracted once (much faster on a CPU)"})
    train_crop_scale: tuple[float, float] = field(default=(0.08, 1.0), metadata={
        "help": "area range of the training random-resized crops"})
    eval_every: int = field(default=1, metadata={"help": "epochs between evaluations"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})
    random_init: bool = field(default=False, metadata={"help": "baseline: the architecture with random weights"})
    seed: int = field(default=0, metadata={"help": "seed of the probe's initialisation and data order"})
    output_dir: str | None = field(default=None, metadata={
        "help": "save the chosen linear layer here (linear_classifier.safetensors) and, when the probe reads the "
                "last block's CLS token only (--n_last_blocks 1 --avgpool_patchtokens false; any ResNet), make the "
                "folder a ViTForImageClassification that pipeline('image-classification') loads"})
    output_json: str | None = field(default=None, metadata={"help": "also write the result JSON here"})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= 1")
        if not self.lr or min(self.lr) <= 0:
            raise ValueError(f"--lr {self.lr}: every learning rate must be > 0")
        if self.n_last_blocks is not None and self.n_last_blocks < 1:
            raise ValueError(f"--n_last_blocks {self.n_last_blocks}: must be >= 1")
        low, high = self.train_crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"--train_crop_scale {low} {high}: must satisfy 0 < min <= max <= 1")
        if self.num_workers < 0:
            raise ValueError(f"--num_workers {self.num_workers}: must be >= 0")


def main(argv: list[str] | None = None) -> None:
    args, data, image = parse_args(LinearProbeArguments, DataArguments, EvaluationImageArguments, argv=argv,
                                   description=__doc__)
    logging.basicConfig(level=logging.INFO)
    device = default_device()
    model, native_size = load_model_or_exit(args.model, device, random_init=args.random_init, seed=args.seed)
    image_size = image.image_size or native_size
    train_split, val_split = load_evaluation_splits(data)
    num_classes = getattr(train_split.features.get(data.label_column), "num_classes", None)
    if num_classes is None:
        num_classes = int(max(train_split[data.label_column])) + 1

    def loader(split, transform, shuffle):
        return torch.utils.data.DataLoader(
            LabelledImageDataset(split, transform, data.image_column, data.label_column),
            batch_size=args.batch_size, shuffle=shuffle, num_workers=args.num_workers, collate_fn=collate_labelled,
            generator=torch.Generator().manual_seed(args.seed) if shuffle else None,
            persistent_workers=args.num_workers > 0)

    center = evaluation_transform(image_size, image.resize_ratio)
    config = LinearProbeConfig(epochs=args.epochs, batch_size=args.batch_size, lrs=tuple(args.lr),
                               momentum=args.momentum, weight_decay=args.weight_decay,
                               n_last_blocks=args.n_last_blocks, avgpool_patchtokens=args.avgpool_patchtokens,
                               eval_every=args.eval_every, augment=args.augmentation, seed=args.seed)
    result = train_linear_probe(
        model, loader(train_split, linear_probe_train_transform(image_size, tuple(args.train_crop_scale)), True),
        loader(val_split, center, False), num_classes, config, device,
        train_eval_loader=loader(train_split, center, False))
    classifier = result.pop("classifier")
    result.update(model=args.model, random_init=args.random_init, image_size=image_size)
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in classifier.state_dict().items()},
                  str(Path(args.output_dir) / "linear_classifier.safetensors"))
        labels = class_names(train_split.features, data.label_column, num_classes)
        folder = save_image_classifier(model, classifier, args.output_dir, labels, image_size, image.resize_ratio,
                                       result)
        result["image_classifier"] = str(folder) if folder else None
    emit_json(result, args.output_json)


if __name__ == "__main__":
    main()
