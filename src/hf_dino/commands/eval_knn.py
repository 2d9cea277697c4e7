"""Weighted k-NN evaluation of a frozen backbone (Caron et al. 2021, Sec. 4.1).

    python scripts/eval_knn.py --model OUTPUT_DIR/teacher_backbone --dataset_name DATA [--k 10 20 100 200]

The training split is the memory bank, the held-out split the queries; features are the CLS
token after the final norm (other readouts with --feature), L2-normalised; each of the k nearest neighbours votes with
exp(cosine / temperature). Prints and writes {"top1", "top5", "k", "temperature", "num_train",
"num_val", "num_processes", "images_per_process", ...}.

    accelerate launch --multi_gpu --num_processes 2 scripts/eval_knn.py --model ... shards the feature
    extraction over the processes (each embeds its share; the result is the one-process result).
    (On GPUs `--multi_gpu` is implied when several are visible; without GPUs it is needed.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..cli import DataArguments, emit_json, load_evaluation_splits, model_field, parse_args, usage_error
from .model_loading import default_device, load_model_or_exit
from ..evaluation import RawPixels, knn_evaluate_splits
from ..evaluation.features import knn_feature_fn


@dataclass
class EvaluationImageArguments:
    """How evaluation images are sized (shared by k-NN and the linear probe)."""

    image_size: int | None = field(default=None, metadata={
        "help": "side of the centre crop; unset: the model's native size (32 for the demo, 224 for ViT-S/16)"})
    resize_ratio: float = field(default=256 / 224, metadata={
        "help": "resize the shortest side to image_size * ratio, then centre-crop image_size; "
                "1.0 keeps whole low-resolution images such as CIFAR's"})

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size {self.image_size}: must be >= 1")
        if self.resize_ratio < 1.0:
            raise ValueError(f"--resize_ratio {self.resize_ratio}: must be >= 1.0 (the crop lies inside the resize)")


@dataclass
class KnnArguments:
    model: str | None = model_field(required=False)
    k: list[int] = field(default_factory=lambda: [20], metadata={
        "help": "number(s) of neighbours; the first is the headline result, all go under per_k"})
    temperature: float = field(default=0.07, metadata={"help": "temperature of the exp(cosine / T) votes"})
    batch_size: int = field(default=256, metadata={"help": "images per feature-extraction batch"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})
    random_init: bool = field(default=False, metadata={
        "help": "baseline: the model's architecture with random weights (seeded by --seed)"})
    raw_pixels: bool = field(default=False, metadata={
        "help": "baseline: the normalised pixels (at --image_size, default 32) as features; --model is ignored"})
    seed: int = field(default=0, metadata={"help": "seed of --random_init"})
    feature: str = field(default="cls", metadata={
        "help": "ViT readout: cls (the paper's: CLS token after the final norm), cls_mean_patch (CLS and mean "
                "patch token of the last block, concatenated) or last_blocks (CLS of the last --n_last_blocks "
                "blocks, each after the final norm)", "choices": ["cls", "cls_mean_patch", "last_blocks"]})
    n_last_blocks: int | None = field(default=None, metadata={
        "help": "blocks read by --feature last_blocks; unset: 4, or all of a shallower ViT"})
    output_json: str | None = field(default=None, metadata={"help": "also write the result JSON here"})

    def __post_init__(self) -> None:
        if not self.k or min(self.k) < 1:
            raise ValueError(f"--k {self.k}: every k must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"--temperature {self.temperature}: must be > 0")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size {self.batch_size}: must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"--num_workers {self.num_workers}: must be >= 0")
        if self.n_last_blocks is not None and self.n_last_blocks < 1:
            raise ValueError(f"--n_last_blocks {self.n_last_blocks}: must be >= 1")


def main(argv: list[str] | None = None) -> None:
    args, data, image = parse_args(KnnArguments, DataArguments, EvaluationImageArguments, argv=argv,
                                   description=__doc__)
    if not args.model and not args.raw_pixels:
        usage_error("--model is required (a backbone folder or Hub id), or --raw_pixels for the pixel baseline")
    logging.basicConfig(level=logging.INFO)
    accelerator = process_group_accelerator()
    device = accelerator.device if accelerator is not None else default_device()
    if args.raw_pixels:
        model, native_size = RawPixels(), 32
    else:
        model, native_size = load_model_or_exit(args.model, device, random_init=args.random_init, seed=args.seed)
    try:
        knn_feature_fn(args.feature, args.n_last_blocks, model)
    except ValueError as error:
        usage_error(str(error))
    train_split, val_split = load_evaluation_splits(data)
    result = knn_evaluate_splits(
        model, train_split, val_split, crop_size=image.image_size or native_size, ks=args.k,
        temperature=args.temperature, image_column=data.image_column, label_column=data.label_column,
        batch_size=args.batch_size, num_workers=args.num_workers, device=device, resize_ratio=image.resize_ratio,
        feature=args.feature, n_last_blocks=args.n_last_blocks, accelerator=accelerator)
    if accelerator is None or accelerator.is_main_process:
        emit_json(result, args.output_json)
    if accelerator is not None:
        accelerator.end_training()


def process_group_accelerator():
    """Under `accelerate launch --num_processes N` (N > 1): an `Accelerator` over the N processes, so
    that each embeds a shard of the images (gloo on CPUs); None for one process."""
    from ..distributed import cpu_process_group_arguments, warn_if_launched_as_one_process

    warn_if_launched_as_one_process()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(**cpu_process_group_arguments())


if __name__ == "__main__":
    main()
