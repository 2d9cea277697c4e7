#!/usr/bin/env python
"""Convert a facebookresearch/dino checkpoint to a transformers backbone folder (+ DinoModel).

python scripts/convert_dino_checkpoint.py --checkpoint dino_deitsmall16_pretrain.pth --output_dir dino-vits16
python scripts/convert_dino_checkpoint.py --checkpoint checkpoint.pth --output_dir run --checkpoint_key teacher

A backbone release gives OUTPUT_DIR = a plain ViTModel / ResNetModel folder (config, safetensors,
image processor, model card). A full training checkpoint also gives OUTPUT_DIR/dino (the
DinoModel with its head, and the loss centre in dino_loss.safetensors).
"""

import argparse
import json

from hf_dino.conversion import convert_reference_checkpoint, save_converted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="reference .pth file (loaded with weights_only=True)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--checkpoint_key", default="teacher", help="network of a full checkpoint: teacher|student")
    parser.add_argument("--num_attention_heads", type=int, default=None,
                        help="only for ViT widths other than 192/384/768")
    args = parser.parse_args()
    converted = convert_reference_checkpoint(args.checkpoint, args.checkpoint_key, args.num_attention_heads)
    written = save_converted(converted, args.output_dir, args.checkpoint)
    print(json.dumps(written, indent=2))


if __name__ == "__main__":
    main()
