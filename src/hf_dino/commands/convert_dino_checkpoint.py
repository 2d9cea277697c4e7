"""Convert a facebookresearch/dino checkpoint to a transformers backbone folder (+ DinoModel).

    python scripts/convert_dino_checkpoint.py --checkpoint dino_deitsmall16_pretrain.pth --output_dir dino-vits16
    python scripts/convert_dino_checkpoint.py --checkpoint checkpoint.pth --output_dir run --checkpoint_key teacher

A backbone release gives OUTPUT_DIR = a plain ViTModel / ResNetModel folder (config, safetensors,
image processor, model card). A full training checkpoint also gives OUTPUT_DIR/dino (the
DinoModel with its head, and the loss centre in dino_loss.safetensors). Checkpoints are read
with torch.load(weights_only=True): no code in them runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import parse_args, usage_error


@dataclass
class ConversionArguments:
    checkpoint: str = field(metadata={"help": "the reference's .pth file (loaded with weights_only=True)"})
    output_dir: str = field(metadata={"help": "folder of the converted model"})
    checkpoint_key: str = field(default="teacher", metadata={
        "help": "network of a full training checkpoint", "choices": ["teacher", "student"]})
    num_attention_heads: int | None = field(default=None, metadata={
        "help": "only for ViT widths other than 192/384/768"})


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(ConversionArguments, argv=argv, description=__doc__)
    if not Path(args.checkpoint).is_file():
        usage_error(f"--checkpoint {args.checkpoint}: no such file; give a reference .pth checkpoint")
    from ..conversion import convert_reference_checkpoint, save_converted

    converted = convert_reference_checkpoint(args.checkpoint, args.checkpoint_key, args.num_attention_heads)
    written = save_converted(converted, args.output_dir, args.checkpoint)
    print(json.dumps(written, indent=2))


if __name__ == "__main__":
    main()
