"""Push a finished pretraining run's teacher backbone (and model card) to the Hub.

    python scripts/push_to_hub.py OUTPUT_DIR --hub_model_id ORG/NAME [--hub_private_repo]
        [--linear_json eval_linear.json] [--knn_json eval_knn.json] [--include_dino] [--space ORG/SPACE]

The card is re-rendered from OUTPUT_DIR/recipe.json and results.json, plus the evaluation JSONs
given here (they enter the card's model-index). With --space, a Gradio Space running the demo app
(attention maps, nearest neighbours) for the model is written to OUTPUT_DIR/space/ and uploaded,
and the card links it. A failed upload is reported (exit code 1); the written folders stay.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import parse_args, usage_error


@dataclass
class PushArguments:
    output_dir: str = field(metadata={"help": "a finished scripts/pretrain.py --output_dir (also positional)"})
    hub_model_id: str = field(metadata={"help": "ORG/NAME of the Hub model repository"})
    hub_private_repo: bool = field(default=False, metadata={"help": "create the repository private"})
    knn_json: str | None = field(default=None, metadata={
        "help": "eval_knn.py --output_json (replaces the run's own k-NN in the card)"})
    linear_json: str | None = field(default=None, metadata={"help": "eval_linear.py --output_json"})
    include_dino: bool = field(default=False, metadata={"help": "also upload dino/ (backbone + head)"})
    space: str | None = field(default=None, metadata={
        "help": "ORG/NAME of a Gradio Space to write (OUTPUT_DIR/space/) and upload with the demo app for this "
                "model; the model card links it"})

    def __post_init__(self) -> None:
        if self.space is not None and (self.space.count("/") != 1 or not all(self.space.split("/"))):
            raise ValueError(f"--space {self.space}: must be ORG/NAME")
        if self.hub_model_id.count("/") != 1 or not all(self.hub_model_id.split("/")):
            raise ValueError(f"--hub_model_id {self.hub_model_id}: must be ORG/NAME")


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(PushArguments, argv=argv, description=__doc__, positional="output_dir")
    extra = {}
    for key, path in (("knn", args.knn_json), ("linear", args.linear_json)):
        if path:
            if not Path(path).is_file():
                usage_error(f"--{key}_json {path}: no such file")
            extra[key] = json.loads(Path(path).read_text())
    if not (Path(args.output_dir) / "teacher_backbone" / "config.json").is_file():
        usage_error(f"--output_dir {args.output_dir}: not a finished hf_dino run (no teacher_backbone/config.json)")
    logging.basicConfig(level=logging.INFO)
    from ..hub import push_run

    ok = push_run(args.output_dir, args.hub_model_id, args.hub_private_repo, extra, args.include_dino,
                  space_id=args.space)
    print(f"push to {args.hub_model_id}: {'done' if ok else 'FAILED (see the warning above)'}")
    if args.space:
        from ..demo.space import push_space, write_space

        folder = write_space(Path(args.output_dir) / "space", args.hub_model_id)
        space_ok = push_space(folder, args.space, private=args.hub_private_repo)
        print(f"Space {folder} -> {args.space}: {'done' if space_ok else 'FAILED (see the warning above)'}")
        ok = ok and space_ok
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
