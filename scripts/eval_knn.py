#!/usr/bin/env python
"""Weighted k-NN evaluation of a frozen backbone (Caron et al. 2021, Sec. 4.1).

python scripts/eval_knn.py --model OUTPUT_DIR/teacher_backbone --dataset_name DATA [--k 10 20 100 200]
"""

import argparse
import json
import logging

import torch

from hf_dino.data import FALLBACK_VAL_SPLITS, load_dataset_dict, select_split
from hf_dino.evaluation import RawPixels, knn_evaluate_splits, load_frozen_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="backbone or DinoModel folder, or a Hub id")
    parser.add_argument("--dataset_name", default=None, help="Hub id, local folder or glob (default: demo data)")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--val_split", default="validation", help="falls back to 'test' when absent")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--k", type=int, nargs="+", default=[20])
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--image_size", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--resize_ratio", type=float, default=256 / 224,
                        help="resize to image_size * ratio, then centre-crop image_size (1.0: whole image)")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_val_samples", type=int, default=None)
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
    dataset_dict = load_dataset_dict(args.dataset_name)
    train_split = select_split(dataset_dict, args.train_split)
    val_split = select_split(dataset_dict, args.val_split, fallbacks=FALLBACK_VAL_SPLITS)
    if args.max_val_samples is not None:
        val_split = val_split.select(range(min(args.max_val_samples, len(val_split))))
    result = knn_evaluate_splits(
        model, train_split, val_split, crop_size=args.image_size or native_size, ks=args.k,
        temperature=args.temperature, image_column=args.image_column, label_column=args.label_column,
        batch_size=args.batch_size, num_workers=args.num_workers, device=device,
        max_train_samples=args.max_train_samples, resize_ratio=args.resize_ratio)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output_json:
        with open(args.output_json, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
