#!/usr/bin/env python
"""Last-block CLS self-attention maps of a ViT (DINO Fig. 1/3), one PNG per head plus an overlay.

python scripts/visualize_attention.py --model OUTPUT_DIR/teacher_backbone --image photo.jpg \\
    --output_dir attention/ [--image_size 480 --threshold 0.6]
"""

import argparse
import json
import logging

import albumentations as A
import cv2
import torch

from hf_dino.attention import (attention_mass_masks, last_block_cls_attention, save_attention_figures,
                               upsample_to_image, vit_backbone)
from hf_dino.data import decode_image
from hf_dino.evaluation import load_frozen_backbone
from hf_dino.transforms import evaluation_transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="ViT backbone or DinoModel folder, or a Hub id")
    parser.add_argument("--image", required=True, help="path of the image")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--image_size", type=int, default=None,
                        help="square side the image is resized and centre-cropped to (default: the model's "
                             "native size); rounded down to a multiple of the patch size")
    parser.add_argument("--threshold", type=float, default=0.6, help="fraction of attention mass the masks keep")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    model, native_size = load_frozen_backbone(args.model)
    patch = vit_backbone(model).config.patch_size
    size = (args.image_size or native_size) // patch * patch
    image = decode_image(args.image)
    if image is None:
        raise SystemExit(f"Cannot decode {args.image} as an image")
    shown = A.Compose([A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC),
                       A.CenterCrop(height=size, width=size)])(image=image)["image"]
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
