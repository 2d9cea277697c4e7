#!/usr/bin/env python
"""DINO pretraining: `accelerate launch scripts/pretrain.py [--config configs/NAME.yaml] [--field value ...]`.

With no arguments it trains the embedded CPU demo (configs/demo_cifar10_cpu.yaml) and prints
the teacher's k-NN accuracy.
"""

import logging
import sys
from pathlib import Path

from hf_dino.recipe import parse_recipe
from hf_dino.trainer import DinoTrainer

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_cifar10_cpu.yaml"


def main(argv: list[str]) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if "--config" not in argv and not any(arg.startswith("--config=") for arg in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    recipe = parse_recipe(argv)
    results = DinoTrainer(recipe).train()
    logging.getLogger("hf_dino").info("Outputs in %s (steps: %d)", recipe.output_dir, results["global_step"])


if __name__ == "__main__":
    main(sys.argv[1:])
