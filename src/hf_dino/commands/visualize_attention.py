"""Last-block CLS self-attention maps of a ViT (DINO Fig. 1/3): one PNG per head plus an overlay.

    python scripts/visualize_attention.py --model OUTPUT_DIR/teacher_backbone --image photo.jpg \\
        --output_dir attention/ [--image_size 480 --threshold 0.6]

Writes attn-head{i}.png per head and overlay.png with the masks keeping `threshold` of each
head's attention mass (the reference's visualize_attention.py rule: the fewest most-attended
patches holding that share); prints a JSON summary. The maps come from one forward pass that
computes only the [CLS] row of the last block's attention (hf_dino.visualization.attention).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import model_field, parse_args, usage_error
from .model_loading import load_model_or_exit


@dataclass
class AttentionArguments:
    model: str = model_field(help="ViT backbone or DinoModel folder, or a Hub id")
    image: str = field(metadata={"help": "path of the image"})
    output_dir: str = field(metadata={"help": "where the PNGs are written"})
    image_size: int | None = field(default=None, metadata={
        "help": "square side the image is resized and centre-cropped to (unset: the model's native size); "
                "rounded down to a multiple of the patch size"})
    threshold: float = field(default=0.6, metadata={"help": "fraction of attention mass the masks keep"})

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"--threshold {self.threshold}: must lie in (0, 1]")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size {self.image_size}: must be >= 1")


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(AttentionArguments, argv=argv, description=__doc__)
    if not Path(args.image).is_file():
        usage_error(f"--image {args.image}: no such file")
    from ..visualization.attention import (attention_mass_masks, last_block_cls_attention, save_attention_figures,
                             upsample_to_image, vit_backbone)
    from ..data import decode_image
    from ..transforms import centre_square, evaluation_transform

    image = decode_image(args.image)
    if image is None:
        usage_error(f"--image {args.image}: cannot be decoded as an image")
    logging.basicConfig(level=logging.INFO)
    model, native_size = load_model_or_exit(args.model, "cpu")
    patch = vit_backbone(model).config.patch_size
    size = (args.image_size or native_size) // patch * patch
    shown = centre_square(image, size)
    pixels = evaluation_transform(size, resize_ratio=1.0)(image=image)["image"][None]
    attention = last_block_cls_attention(model, pixels)[0]  # (heads, h, w)
    masks = attention_mass_masks(attention, args.threshold)
    written = save_attention_figures(shown, upsample_to_image(attention, patch), upsample_to_image(masks, patch),
                                     args.output_dir, args.threshold)
    summary = {"image_size": size, "patch_size": patch, "num_heads": int(attention.shape[0]),
               "grid": list(attention.shape[1:]), "files": [str(path) for path in written],
               "mask_patches_per_head": masks.flatten(1).sum(1).tolist()}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
