"""Copy detection with frozen DINO features on the Copydays layout (the paper's section 4.2).

ROOT/original/*.jpg is the database (plus ROOT/distractors/ when present), ROOT/strong/*.jpg the
queries, and ROOT/jpegqual/N/, ROOT/crops/N/ further query blocks when present; a query's
positives are the originals sharing its first four characters (Copydays naming GGGGkk.jpg).
Feature: CLS concatenated with GeM (p=4) of the patch tokens at an --imsize square, whitened on
--whitening_data when given, L2-normalised; mAP over the 20 best results.

    python scripts/eval_copy_detection.py --model dino-vitb8 --data_path data/copydays \\
        --whitening_data data/yfcc_20k --imsize 320 --output_json results/copydays.json

JSON keys (percent): mAP (strong), mAP_<block> for jpegqual/N and crops/N blocks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import SearchRunArguments, emit_json, model_field, parse_args, usage_error
from .model_loading import default_device, load_model_or_exit


@dataclass
class CopyDetectionArguments:
    model: str = model_field()
    data_path: str = field(metadata={"help": "Copydays root holding original/ and strong/ (jpegqual/, crops/, "
                                             "distractors/ optional)"})
    imsize: int = field(default=320, metadata={"help": "images are resized to this exact square (bicubic)"})
    whitening_data: str | None = field(default=None, metadata={
        "help": "folder of images to fit the PCA whitening on (the paper: 20k YFCC100M images); none: no whitening"})
    distractors_path: str | None = field(default=None, metadata={
        "help": "folder of distractor images added to the database (default: ROOT/distractors when present)"})
    batch_size: int = field(default=16, metadata={"help": "images per forward pass"})
    search_backend: str = field(default="torch", metadata={
        "help": "nearest-neighbour search: chunked torch matmul, or faiss (pip install 'hf_dino[faiss]')",
        "choices": ["torch", "faiss"]})

    def __post_init__(self) -> None:
        if self.imsize < 16:
            raise ValueError(f"--imsize {self.imsize}: must be >= 16 (one patch)")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size {self.batch_size}: must be >= 1")


def main(argv: list[str] | None = None) -> None:
    args, run = parse_args(CopyDetectionArguments, SearchRunArguments, argv=argv, description=__doc__)
    from ..evaluation.copy_detection import evaluate_copy_detection, read_layout
    from ..evaluation.search import UnreadableImageError, faiss_available, list_images, model_fingerprint

    if not Path(args.data_path).is_dir():
        usage_error(f"--data_path {args.data_path}: no such directory; give the Copydays root (original/, strong/)")
    try:
        layout = read_layout(args.data_path, args.distractors_path)
        for block in layout.query_blocks:
            layout.positives(block)
    except (OSError, ValueError) as error:
        usage_error(str(error))
    if args.whitening_data is not None and not (Path(args.whitening_data).is_dir()
                                                and list_images(args.whitening_data)):
        usage_error(f"--whitening_data {args.whitening_data}: not a folder of images")
    if args.search_backend == "faiss" and not faiss_available():
        usage_error("--search_backend faiss: faiss is not installed; pip install 'hf_dino[faiss]' or use torch")
    device = default_device(run.device)
    model, _ = load_model_or_exit(args.model, device)
    if getattr(getattr(model, "backbone", model).config, "model_type", None) != "vit":
        usage_error(f"--model {args.model}: copy detection needs a ViT (CLS and patch tokens)")
    try:
        result = evaluate_copy_detection(
            model, args.data_path, imsize=args.imsize, whitening_data=args.whitening_data,
            distractors=args.distractors_path, batch_size=args.batch_size, num_workers=run.num_workers,
            device=device, features_cache=run.features_cache, model_key=model_fingerprint(args.model),
            search_backend=args.search_backend)
    except UnreadableImageError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(1) from None
    result.update({"model": args.model, "imsize": args.imsize})
    emit_json(result, run.output_json)


if __name__ == "__main__":
    main()
