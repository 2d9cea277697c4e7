#!/usr/bin/env python
"""20-NN of demo teachers on held-out CIFAR-10 images, the protocol of issue 18.

The memory bank is the 10,000 demo training images (`hf_dino/demo_data/cifar10/train.parquet`).
Queries, chosen by content (SHA-1 of the decoded pixels) so that no image is in both:
  - `val`: the first 5,000 images of CIFAR-10 train (`--cifar10_dir`/train.parquet) outside the
    demo's training images — the split to choose settings on;
  - `test`: the CIFAR-10 test images of `--cifar10_dir`/test.parquet outside the demo's own
    evaluation split (4,000 of the shared 5,000) — to report, not to tune on.
For each model (a teacher_backbone folder, or `pixels` for the raw-pixel baseline): k = 20,
T = 0.07, every `--features` readout and every `--resize_ratios` (1.143 = eval_knn's default,
1.0 = whole 32 px images).

    python benchmarks/demo_knn.py outputs/demo_cifar10_cpu/teacher_backbone pixels \\
        --cifar10_dir ../shared/data/cifar10 --splits val test --output_json demo_knn.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

DEMO_DATA = Path(__file__).resolve().parents[1] / "src" / "hf_dino" / "demo_data" / "cifar10"


def pixel_keys(table) -> list[str]:
    """SHA-1 of each image's decoded RGB pixels in a pyarrow table (PNG bytes of equal pixels may differ)."""
    images = table.column("image").to_pylist()
    return [hashlib.sha1(np.asarray(Image.open(io.BytesIO(image["bytes"])).convert("RGB")).tobytes()).hexdigest()
            for image in images]


def held_out_queries(cifar10_dir: Path, work_dir: Path) -> dict[str, Path]:
    """Write val.parquet and test.parquet (see the module docstring) into `work_dir`."""
    work_dir.mkdir(parents=True, exist_ok=True)
    demo_train, demo_test = (set(pixel_keys(pq.read_table(DEMO_DATA / name, columns=["image"])))
                             for name in ("train.parquet", "test.parquet"))
    files = {}
    for split, source, excluded, limit in (("val", "train.parquet", demo_train, 5000),
                                           ("test", "test.parquet", demo_test, None)):
        table = pq.read_table(cifar10_dir / source)
        keys = pixel_keys(table)
        rows = [index for index, key in enumerate(keys) if key not in excluded][:limit]
        files[split] = work_dir / f"{split}.parquet"
        pq.write_table(table.take(rows), files[split])
        print(f"{split}: {len(rows)} queries from {cifar10_dir / source} ({len(keys) - len(rows)} left out)")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="teacher_backbone folders, or 'pixels'")
    parser.add_argument("--cifar10_dir", type=Path, required=True, help="folder with CIFAR-10 train.parquet, test.parquet")
    parser.add_argument("--splits", nargs="+", default=["val"], choices=["val", "test"], help="query sets")
    parser.add_argument("--features", nargs="+", default=["cls", "cls_mean_patch"],
                        choices=["cls", "cls_mean_patch", "last_blocks"], help="k-NN readouts (eval_knn --feature)")
    parser.add_argument("--resize_ratios", nargs="+", type=float, default=[256 / 224, 1.0])
    parser.add_argument("--image_sizes", nargs="+", type=int, default=None,
                        help="input sides in pixels (default: each model's own, 32 for pixels); a ViT saved at "
                             "another size resamples its saved position grid, which is close to, not the same as, "
                             "training with that --eval_image_size")
    parser.add_argument("--work_dir", type=Path, default=Path("demo_knn_queries"), help="where the query sets go")
    parser.add_argument("--output_json", type=Path)
    args = parser.parse_args()

    from datasets import load_dataset

    from hf_dino.evaluation import RawPixels, knn_evaluate_splits, load_frozen_backbone

    queries = held_out_queries(args.cifar10_dir, args.work_dir)
    bank = load_dataset("parquet", data_files=str(DEMO_DATA / "train.parquet"), split="train")
    query_splits = {split: load_dataset("parquet", data_files=str(queries[split]), split="train")
                    for split in args.splits}
    results = {}
    for name in args.models:
        model, native_size = (RawPixels(), 32) if name == "pixels" else load_frozen_backbone(name)
        for split, size in itertools.product(args.splits, args.image_sizes or [native_size]):
            query_split = query_splits[split]
            for feature in args.features:
                for ratio in args.resize_ratios:
                    result = knn_evaluate_splits(model, bank, query_split, crop_size=size, ks=(20,), temperature=0.07,
                                                 resize_ratio=ratio, feature=feature)
                    key = f"{split}/{feature}/{ratio:.3f}" + (f"/{size}px" if args.image_sizes else "")
                    results.setdefault(name, {})[key] = round(result["top1"], 2)
                    print(f"{name} {key}: {result['top1']:.2f}%")
    print(json.dumps(results, indent=2))
    if args.output_json:
        args.output_json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
