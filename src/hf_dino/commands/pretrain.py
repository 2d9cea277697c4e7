"""DINO self-supervised pretraining (Caron et al. 2021).

    accelerate launch scripts/pretrain.py [--config configs/NAME.yaml] [--FIELD VALUE ...]

With no arguments it trains the embedded CPU demo (the packaged configs/demo_cifar10_cpu.yaml:
a small ViT on a 10,000-image CIFAR-10 sample) and prints the teacher's k-NN accuracy. A recipe
is a YAML file of the fields below; `--config` also takes a packaged recipe by name
(vit_small_16, vit_base_8, resnet50, ...). The defaults shown are the ones in force.
"""

from __future__ import annotations

import logging

from ..recipe import DEFAULT_CONFIG, parse_recipe


def main(argv: list[str] | None = None) -> None:
    recipe = parse_recipe(argv, default_config=DEFAULT_CONFIG, description=__doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from ..trainer import DinoTrainer

    results = DinoTrainer(recipe).train()
    logging.getLogger("hf_dino").info("Outputs in %s (steps: %d)", recipe.output_dir, results["global_step"])


if __name__ == "__main__":
    main()
