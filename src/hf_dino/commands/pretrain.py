"""DINO self-supervised pretraining (Caron et al. 2021).

    accelerate launch scripts/pretrain.py [--config configs/NAME.yaml] [--FIELD VALUE ...]

With neither --config nor --dataset_name it trains the embedded CPU demo (the packaged
configs/demo_cifar10_cpu.yaml: a small ViT on a 10,000-image CIFAR-10 sample) and prints the
teacher's k-NN accuracy. With a --dataset_name and no --config the recipe is the paper's ViT-S/16
(the defaults of every field below). A recipe is a YAML file of the fields below; `--config` also
takes a packaged recipe by name (vit_small_16, vit_base_8, resnet50, ...). The defaults shown are
the ones in force; the first log line names the recipe and where each of its values came from.
"""

from __future__ import annotations

import logging
import os
import sys

from ..recipe import default_recipe_file, parse_recipe, recipe_sources


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    default_config = default_recipe_file(argv)
    recipe = parse_recipe(argv, default_config=default_config, description=__doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger("hf_dino").info(recipe_sources(argv, default_config))
    from ..trainer import DinoTrainer

    results = DinoTrainer(recipe).train()
    logging.getLogger("hf_dino").info("Outputs in %s (steps: %d)", recipe.output_dir, results["global_step"])


if __name__ == "__main__":
    main()
