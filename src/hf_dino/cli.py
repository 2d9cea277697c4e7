"""Command-line pieces shared by the evaluation scripts: the data arguments of DESIGN.md,
the evaluation splits, and the JSON result every script prints and writes."""

from __future__ import annotations

import argparse
import json

from .data import FALLBACK_VAL_SPLITS, load_dataset_dict, select_split


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset_name, --train_split, --val_split, --image_column, --label_column and the sample caps."""
    parser.add_argument("--dataset_name", default=None, help="Hub id, local folder or glob (default: demo data)")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--val_split", default="validation", help="falls back to 'test' when absent")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--max_train_samples", type=int, default=None, help="first N training images only")
    parser.add_argument("--max_val_samples", type=int, default=None, help="first N held-out images only")


def add_evaluation_size_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image_size", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--resize_ratio", type=float, default=256 / 224,
                        help="resize to image_size * ratio, then centre-crop image_size (1.0: whole image)")


def load_evaluation_splits(args: argparse.Namespace):
    """(train split, held-out split) of `args.dataset_name`, capped by --max_*_samples."""
    dataset_dict = load_dataset_dict(args.dataset_name)
    train_split = select_split(dataset_dict, args.train_split)
    val_split = select_split(dataset_dict, args.val_split, fallbacks=FALLBACK_VAL_SPLITS)
    if args.max_train_samples is not None:
        train_split = train_split.select(range(min(args.max_train_samples, len(train_split))))
    if args.max_val_samples is not None:
        val_split = val_split.select(range(min(args.max_val_samples, len(val_split))))
    return train_split, val_split


def emit_json(result: dict, output_json: str | None) -> None:
    """Print the result and write it to `output_json` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if output_json:
        with open(output_json, "w") as handle:
            handle.write(text + "\n")
