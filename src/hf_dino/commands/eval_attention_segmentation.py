"""Probe the self-attention map (DINO section 4.3): Jaccard of the last block's thresholded [CLS]
attention against ground-truth object masks, per head and for the head-averaged attention.

  python scripts/eval_attention_segmentation.py --model dino-vits16 --data_path DAVIS \\
      --sequences blackswan,car-shadow --max_frames 10 --output_json attention_davis.json
  python scripts/eval_attention_segmentation.py --model dino-vits16 --data_path VOC2012 \\
      --dataset_layout voc --random_init_baseline --save_overlays overlays/

Each image is resized to an IMAGE_SIZE square and cropped to a multiple of the patch size (the
ground truth with it); each head keeps the fewest most-attended patches holding THRESHOLD of its
[CLS]->patch attention (the reference's visualize_attention.py rule), upsampled by nearest.
Scores in percent, means over images: per_head, mean_head, best_head (+ best_head_index),
averaged_attention (the mask of the head-averaged attention), and the centre_prior baseline (a
centred square of the averaged masks' mean area); with --random_init_baseline the same scores
of the same ViT at random initialisation under "random_init".

DATA_PATH: DAVIS (JPEGImages/480p/SEQ/*.jpg, Annotations/480p/SEQ/*.png; foreground =
annotation > 0) or PASCAL VOC (JPEGImages/, SegmentationObject/ or SegmentationClass/,
ImageSets/Segmentation/val.txt; foreground = any object, the 255 border ignored).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import emit_json, model_field, parse_args, usage_error
from .model_loading import default_device, load_model_or_exit

logger = logging.getLogger(__name__)


@dataclass
class Arguments:
    model: str = model_field(help="ViT backbone folder (teacher_backbone/), DinoModel folder (dino/) or Hub id "
                                  "such as facebook/dino-vits16")
    data_path: str = field(metadata={"help": "dataset root in the DAVIS or the PASCAL VOC layout"})
    dataset_layout: str | None = field(default=None, metadata={
        "help": "davis or voc; default: davis when DATA_PATH has JPEGImages/480p and Annotations/480p, voc when "
                "it has JPEGImages and ImageSets/Segmentation", "choices": ["davis", "voc"]})
    sequences: str | None = field(default=None, metadata={
        "help": "davis: comma-separated sequence names; default: those ImageSets/480p/val.txt (or 2017/val.txt) "
                "names, else every sequence folder"})
    max_frames: int | None = field(default=None, metadata={
        "help": "davis: the first N annotated frames of each sequence (default: all)"})
    image_set: str = field(default="val", metadata={
        "help": "voc: the image list ImageSets/Segmentation/IMAGE_SET.txt"})
    max_images: int | None = field(default=None, metadata={"help": "voc: the first N images of the list only"})
    image_size: int = field(default=480, metadata={
        "help": "side of the square every image is resized to (then cropped to a multiple of the patch size)"})
    threshold: float = field(default=0.6, metadata={
        "help": "fraction of each map's attention mass the mask keeps, in (0, 1]"})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass"})
    random_init_baseline: bool = field(default=False, metadata={
        "help": "also score the same ViT at random initialisation (seeded by --seed), under random_init"})
    seed: int = field(default=0, metadata={"help": "seed of the random-initialisation baseline"})
    reference_pos_interpolation: bool = field(default=False, metadata={
        "help": "interpolate position embeddings as the reference does (scale factors with +0.1) instead of "
                "to the exact grid size"})
    save_overlays: str | None = field(default=None, metadata={
        "help": "write one PNG per image here (SEQ/NNNNN.png or ID.png): the image with the ground truth's "
                "outline, and the mask of the head-averaged attention"})
    device: str | None = field(default=None, metadata={"help": "torch device; default cuda when available, else cpu"})
    output_json: str | None = field(default=None, metadata={"help": "write the result JSON here (it is also printed)"})

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"--threshold {self.threshold}: must lie in (0, 1]")
        for name in ("image_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= 1")
        for name in ("max_frames", "max_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} {value}: must be >= 1 (or unset for all)")


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(Arguments, argv=argv, description=__doc__)
    from ..visualization.attention import vit_backbone
    from ..evaluation.attention_segmentation import (SegmentationInputError, davis_samples, detect_layout,
                                                     evaluate_attention_segmentation, voc_samples)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.data_path).is_dir():
        usage_error(f"--data_path {args.data_path}: no such directory; give a DAVIS or PASCAL VOC root")
    try:
        layout = args.dataset_layout or detect_layout(args.data_path)
    except SegmentationInputError as error:
        usage_error(f"--data_path {error}; or say which with --dataset_layout davis|voc")
    davis_only = [name for name in ("sequences", "max_frames") if getattr(args, name) is not None]
    voc_only = [name for name in ("max_images",) if getattr(args, name) is not None]
    if layout == "voc" and davis_only:
        usage_error(f"--{davis_only[0]} applies to the davis layout only (this is {layout}; use --max_images)")
    if layout == "davis" and voc_only:
        usage_error(f"--{voc_only[0]} applies to the voc layout only (this is {layout}; use --max_frames)")
    try:
        if layout == "davis":
            names = [s.strip() for s in args.sequences.split(",") if s.strip()] if args.sequences else None
            if args.sequences is not None and not names:
                usage_error(f"--sequences {args.sequences!r}: no sequence named")
            samples = davis_samples(args.data_path, names, args.max_frames)
        else:
            samples = voc_samples(args.data_path, args.image_set, args.max_images)
    except SegmentationInputError as error:
        usage_error(str(error))
    if not samples:
        usage_error(f"--data_path {args.data_path}: no annotated image found")

    device = default_device(args.device)
    model, _ = load_model_or_exit(args.model, device)
    try:
        patch = vit_backbone(model).config.patch_size
    except ValueError:
        kind = getattr(getattr(model, "backbone", model).config, "model_type", None)
        usage_error(f"--model {args.model}: the attention probe needs a ViT backbone, got {kind!r}")
    if args.image_size < patch:
        usage_error(f"--image_size {args.image_size}: must be at least the model's patch size {patch}")

    def run(network, overlays):
        try:
            return evaluate_attention_segmentation(network, samples, layout, args.image_size, args.threshold,
                                                   args.batch_size, device, overlays, log=logger.info,
                                                   reference_interpolation=args.reference_pos_interpolation)
        except SegmentationInputError as error:
            usage_error(str(error))

    result = {"model": args.model, "dataset_layout": layout, "data_path": args.data_path,
              "image_size": args.image_size, "threshold": args.threshold,
              "reference_pos_interpolation": args.reference_pos_interpolation}
    if layout == "davis":
        result["sequences"] = list(dict.fromkeys(sample.group for sample in samples))
    result.update(run(model, args.save_overlays))
    if args.save_overlays:
        result["overlays"] = args.save_overlays
    if args.random_init_baseline:
        baseline, _ = load_model_or_exit(args.model, device, random_init=True, seed=args.seed)
        scores = run(baseline, None)
        result["random_init"] = {key: scores[key] for key in (
            "per_head", "mean_head", "best_head", "best_head_index", "averaged_attention", "centre_prior",
            "centre_prior_area")}
        result["random_init"]["seed"] = args.seed
    emit_json(result, args.output_json)


if __name__ == "__main__":
    main()
