"""DAVIS video object segmentation by label propagation of frozen ViT patch features (DINO Sec. 4.2).

The first frame's annotation is propagated through each sequence with the reference's protocol
(480p frames, last-layer patch tokens, the first frame + n_last_frames previous predictions as
context, top-k neighbours in a spatial window). Writes OUTPUT_DIR/SEQ/NNNNN.png (palette PNGs of
object ids at the frame size) and prints J&F as the DAVIS toolkit scores semi-supervised results
(percent; first and last frames excluded), with the propagate-nothing baseline.

  python scripts/eval_video_segmentation.py --model dino-vits16 --data_path DAVIS \\
      --output_dir davis_out --output_json davis.json

DATA_PATH: JPEGImages/480p/SEQ/*.jpg, Annotations/480p/SEQ/*.png (DAVIS-2017 palette PNGs or
DAVIS-2016 0/255 masks) and ImageSets/2017/val.txt or ImageSets/480p/val.txt.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..cli import emit_json, model_field, parse_args, usage_error
from .model_loading import default_device, load_model_or_exit
from ..evaluation.video_segmentation import (DavisInputError, PropagationSettings, evaluate_davis, image_set_names,
                                             load_sequence, video_backbone)

logger = logging.getLogger(__name__)


@dataclass
class Arguments:
    model: str = model_field()
    data_path: str = field(metadata={"help": "DAVIS root (JPEGImages/, Annotations/, ImageSets/)"})
    output_dir: str = field(metadata={"help": "segmentations are written to OUTPUT_DIR/SEQ/NNNNN.png"})
    resolution: str = field(default="480p", metadata={"help": "DAVIS resolution folder to read",
                                                      "choices": ["480p", "Full-Resolution"]})
    sequences: str | None = field(default=None, metadata={
        "help": "comma-separated sequence names; default: those the image-set list names"})
    n_last_frames: int = field(default=7, metadata={"help": "previous predictions used as context besides the first frame"})
    size_mask_neighborhood: int = field(default=12, metadata={
        "help": "context patches must lie within this many patch rows and columns (0: anywhere)"})
    topk: int = field(default=5, metadata={"help": "neighbours each patch takes its label from"})
    temperature: float = field(default=0.1, metadata={"help": "softmax temperature of the neighbours' weights"})
    batch_size: int = field(default=8, metadata={"help": "frames encoded per forward pass"})
    affinity_memory_mb: float = field(default=512.0, metadata={
        "help": "largest affinity block computed at once (MiB); larger grids are processed in row bands"})
    reference_normalization: bool = field(default=False, metadata={
        "help": "normalise with the reference script's red std 0.228 (its typo) instead of ImageNet's 0.229"})
    reference_pos_interpolation: bool = field(default=False, metadata={
        "help": "interpolate position embeddings as the reference does (scale factors with +0.1) instead of "
                "to the exact grid size"})
    device: str | None = field(default=None, metadata={"help": "torch device; default cuda when available, else cpu"})
    output_json: str | None = field(default=None, metadata={"help": "write the result JSON here (it is also printed)"})

    def __post_init__(self) -> None:
        for name in ("topk", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= 1")
        for name in ("n_last_frames", "size_mask_neighborhood"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"--temperature {self.temperature}: must be > 0")
        if not self.affinity_memory_mb > 0:
            raise ValueError(f"--affinity_memory_mb {self.affinity_memory_mb}: must be > 0")


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(Arguments, argv=argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.data_path).is_dir():
        usage_error(f"--data_path {args.data_path}: no such directory; give the DAVIS root (JPEGImages/, Annotations/)")
    try:
        names = ([s.strip() for s in args.sequences.split(",") if s.strip()] if args.sequences
                 else image_set_names(args.data_path, args.resolution))
        if not names:
            usage_error(f"--sequences {args.sequences!r}: no sequence named")
        for name in names:  # every sequence checked before anything is written
            load_sequence(args.data_path, name, args.resolution)
    except DavisInputError as error:
        usage_error(str(error))

    device = default_device(args.device)

    model, _ = load_model_or_exit(args.model, device)
    try:
        video_backbone(model)
    except ValueError as error:
        usage_error(f"--model {args.model}: {error}")

    settings = PropagationSettings(
        n_last_frames=args.n_last_frames, size_mask_neighborhood=args.size_mask_neighborhood, topk=args.topk,
        temperature=args.temperature, affinity_memory_mb=args.affinity_memory_mb, batch_size=args.batch_size,
        reference_normalization=args.reference_normalization,
        reference_pos_interpolation=args.reference_pos_interpolation)
    try:
        result = evaluate_davis(model, args.data_path, args.output_dir, names, args.resolution, settings, device,
                                log=logger.info)
    except DavisInputError as error:
        usage_error(str(error))
    result["model"] = args.model
    result["settings"] = asdict(settings)
    emit_json(result, args.output_json)


if __name__ == "__main__":
    main()
