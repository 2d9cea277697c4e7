"""Landmark image retrieval with frozen DINO features on the revisited Oxford / Paris layout
(the paper's section 4.2): mAP and mP@k for revisitop's Easy, Medium and Hard protocols.

ROOT/NAME/jpg/*.jpg and ROOT/NAME/gnd_NAME.pkl (or gnd_NAME.json); any NAME. Each image is shrunk
so that its longest side is --imsize, queries are used whole, the feature is the CLS token
(with --multiscale, the mean over scales 1, 1/sqrt(2), 1/2, as the reference).

    python scripts/eval_image_retrieval.py --model facebook/dino-vits16 --data_path data/revisitop \\
        --dataset roxford5k --imsize 512 --multiscale --output_json results/roxford5k.json

JSON keys (percent): mAP_E, mAP_M, mAP_H, mP@1_M, mP@5_M, mP@10_M, mP@1_H, mP@5_H, mP@10_H.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import SearchRunArguments, emit_json, model_field, parse_args, usage_error
from .model_loading import default_device, load_model_or_exit


@dataclass
class RetrievalArguments:
    model: str = model_field()
    data_path: str = field(metadata={"help": "revisitop root holding NAME/jpg/ and NAME/gnd_NAME.pkl"})
    dataset: str = field(default="roxford5k", metadata={
        "help": "dataset NAME under --data_path: roxford5k, rparis6k or any folder in the same layout"})
    imsize: int = field(default=224, metadata={"help": "longest image side in pixels (images are never enlarged)"})
    multiscale: bool = field(default=False, metadata={
        "help": "mean CLS feature over scales 1, 1/sqrt(2) and 1/2, L2-normalised"})

    def __post_init__(self) -> None:
        if self.imsize < 16:
            raise ValueError(f"--imsize {self.imsize}: must be >= 16 (one patch)")


def main(argv: list[str] | None = None) -> None:
    args, run = parse_args(RetrievalArguments, SearchRunArguments, argv=argv, description=__doc__)
    from ..evaluation.retrieval import dataset_files, evaluate_retrieval
    from ..evaluation.search import UnreadableImageError, model_fingerprint

    if not Path(args.data_path).is_dir():
        usage_error(f"--data_path {args.data_path}: no such directory; give the revisitop root (NAME/jpg/, NAME/gnd_NAME.pkl)")
    if not (Path(args.data_path) / args.dataset).is_dir():
        usage_error(f"--dataset {args.dataset}: no folder {Path(args.data_path) / args.dataset}")
    try:
        dataset_files(args.data_path, args.dataset)
    except (OSError, ValueError) as error:  # missing gnd / images, unsafe or malformed pickle
        usage_error(str(error))
    device = default_device(run.device)
    model, _ = load_model_or_exit(args.model, device)
    try:
        result = evaluate_retrieval(model, args.data_path, args.dataset, imsize=args.imsize,
                                    multiscale=args.multiscale, device=device, num_workers=run.num_workers,
                                    features_cache=run.features_cache, model_key=model_fingerprint(args.model))
    except UnreadableImageError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(1) from None
    result.update({"model": args.model, "imsize": args.imsize, "multiscale": args.multiscale})
    emit_json(result, run.output_json)


if __name__ == "__main__":
    main()
