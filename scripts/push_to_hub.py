#!/usr/bin/env python
"""Push a finished pretraining run's teacher backbone (and model card) to the Hub.

python scripts/push_to_hub.py OUTPUT_DIR --hub_model_id ORG/NAME [--hub_private_repo]
    [--linear_json eval_linear.json] [--knn_json eval_knn.json] [--include_dino]

The card is re-rendered from OUTPUT_DIR/recipe.json and results.json, plus the evaluation JSONs
given here (they enter the card's model-index).
"""

import argparse
import json
import logging
import sys

from hf_dino.hub import push_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a finished scripts/pretrain.py --output_dir")
    parser.add_argument("--hub_model_id", required=True, help="ORG/NAME")
    parser.add_argument("--hub_private_repo", action="store_true")
    parser.add_argument("--knn_json", default=None, help="eval_knn.py --output_json (replaces the run's own k-NN)")
    parser.add_argument("--linear_json", default=None, help="eval_linear.py --output_json")
    parser.add_argument("--include_dino", action="store_true", help="also upload dino/ (backbone + head)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    extra = {}
    for key, path in (("knn", args.knn_json), ("linear", args.linear_json)):
        if path:
            with open(path) as handle:
                extra[key] = json.load(handle)
    ok = push_run(args.output_dir, args.hub_model_id, args.hub_private_repo, extra, args.include_dino)
    print(f"push to {args.hub_model_id}: {'done' if ok else 'FAILED (see the warning above)'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
