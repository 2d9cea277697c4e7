#!/usr/bin/env python
"""Linear probe of a frozen backbone (Caron et al. 2021, Sec. 4.1; the reference's eval_linear).

python scripts/eval_linear.py --model OUTPUT_DIR/teacher_backbone --dataset_name DATA \\
    [--epochs 100 --batch_size 256 --lr 0.001 0.01 0.1 --n_last_blocks 4 --avgpool_patchtokens false]
"""

import argparse
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from hf_dino.cli import add_data_arguments, add_evaluation_size_arguments, emit_json, load_evaluation_splits
from hf_dino.data import LabelledImageDataset, collate_labelled
from hf_dino.evaluation import load_frozen_backbone
from hf_dino.evaluation.linear import LinearProbeConfig, train_linear_probe
from hf_dino.transforms import evaluation_transform, linear_probe_train_transform


def str_to_bool(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")
    return value.lower() in ("true", "1", "yes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="backbone or DinoModel folder, or a Hub id")
    add_data_arguments(parser)
    add_evaluation_size_arguments(parser)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.001],
                        help="base lr(s) at batch 256 (scaled by batch/256); several train in one pass, best reported")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--n_last_blocks", type=int, default=None, help="default: 4 below ViT-B width, else 1")
    parser.add_argument("--avgpool_patchtokens", type=str_to_bool, default=None,
                        help="append pooled patch tokens (default: true from ViT-B width)")
    parser.add_argument("--no_augmentation", action="store_true",
                        help="train on centre crops; features are then extracted once (much faster on a CPU)")
    parser.add_argument("--train_crop_scale", type=float, nargs=2, default=[0.08, 1.0])
    parser.add_argument("--eval_every", type=int, default=1, help="epochs between evaluations")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--random_init", action="store_true", help="baseline: the architecture with random weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="save the chosen linear layer here (safetensors)")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, native_size = load_frozen_backbone(args.model, device, random_init=args.random_init, seed=args.seed)
    image_size = args.image_size or native_size
    train_split, val_split = load_evaluation_splits(args)
    num_classes = getattr(train_split.features.get(args.label_column), "num_classes", None)
    if num_classes is None:
        num_classes = int(max(train_split[args.label_column])) + 1

    def loader(split, transform, shuffle):
        return torch.utils.data.DataLoader(
            LabelledImageDataset(split, transform, args.image_column, args.label_column),
            batch_size=args.batch_size, shuffle=shuffle, num_workers=args.num_workers, collate_fn=collate_labelled,
            generator=torch.Generator().manual_seed(args.seed) if shuffle else None,
            persistent_workers=args.num_workers > 0)

    center = evaluation_transform(image_size, args.resize_ratio)
    config = LinearProbeConfig(epochs=args.epochs, batch_size=args.batch_size, lrs=tuple(args.lr),
                               momentum=args.momentum, weight_decay=args.weight_decay,
                               n_last_blocks=args.n_last_blocks, avgpool_patchtokens=args.avgpool_patchtokens,
                               eval_every=args.eval_every, augment=not args.no_augmentation, seed=args.seed)
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
    emit_json(result, args.output_json)


if __name__ == "__main__":
    main()
