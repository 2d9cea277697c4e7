#!/usr/bin/env python
"""Weighted k-NN evaluation of a frozen backbone (Caron et al. 2021, Sec. 4.1).

python scripts/eval_knn.py --model OUTPUT_DIR/teacher_backbone --dataset_name DATA [--k 10 20 100 200]
"""

import argparse
import logging

import torch

from hf_dino.cli import add_data_arguments, add_evaluation_size_arguments, emit_json, load_evaluation_splits
from hf_dino.evaluation import RawPixels, knn_evaluate_splits, load_frozen_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="backbone or DinoModel folder, or a Hub id")
    add_data_arguments(parser)
    add_evaluation_size_arguments(parser)
    parser.add_argument("--k", type=int, nargs="+", default=[20])
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--random_init", action="store_true",
                        help="baseline: the model's architecture with random weights (seeded by --seed)")
    parser.add_argument("--raw_pixels", action="store_true",
                        help="baseline: the normalised pixels (at --image_size) as features; --model is ignored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    if not args.model and not args.raw_pixels:
        parser.error("--model is required (or --raw_pixels for the pixel baseline)")
    logging.basicConfig(level=logging.INFO)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.raw_pixels:
        model, native_size = RawPixels(), 32
    else:
        model, native_size = load_frozen_backbone(args.model, device, random_init=args.random_init, seed=args.seed)
    train_split, val_split = load_evaluation_splits(args)
    result = knn_evaluate_splits(
        model, train_split, val_split, crop_size=args.image_size or native_size, ks=args.k,
        temperature=args.temperature, image_column=args.image_column, label_column=args.label_column,
        batch_size=args.batch_size, num_workers=args.num_workers, device=device,
        resize_ratio=args.resize_ratio)
    emit_json(result, args.output_json)


if __name__ == "__main__":
    main()
