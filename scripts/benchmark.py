#!/usr/bin/env python
"""Training-step and multi-crop throughput, peak memory and MFU of hf_dino, optionally against
facebookresearch/dino (a local checkout) in the same run, with ratios (hf_dino / reference).

python scripts/benchmark.py --output_json bench.json --reference_repo /path/to/dino
python scripts/benchmark.py --arch vit_tiny --num_hidden_layers 4 --patch_size 8 --global_crop_size 32 \\
    --local_crop_size 16 --local_crops_number 4 --batch_size 64 --out_dim 1024   # the CPU demo's model
"""

import argparse
import os

from hf_dino.benchmark import BenchmarkSettings, compare_quality, run_benchmark
from hf_dino.cli import emit_json
from hf_dino.modeling_dino import ATTENTION_IMPLEMENTATIONS
from hf_dino.recipe import MIXED_PRECISION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchmarkSettings()
    choices = {"mixed_precision": MIXED_PRECISION, "reference_mixed_precision": MIXED_PRECISION,
               "attn_implementation": ATTENTION_IMPLEMENTATIONS}
    for name, value in vars(defaults).items():
        if isinstance(value, bool):
            parser.add_argument(f"--{name}", type=str.lower, default=str(value).lower(), choices=("true", "false"))
            continue
        kind = int if name in ("num_hidden_layers", "threads") else str if name == "reference_mixed_precision" else type(value)
        parser.add_argument(f"--{name}", type=kind, default=value, choices=choices.get(name))
    parser.add_argument("--reference_repo", default=None, help="local checkout of facebookresearch/dino")
    parser.add_argument("--reference_pythonpath", default=None,
                        help="extra import path for the reference only (e.g. where its torchvision is installed)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the implementations this many times, keep the best")
    parser.add_argument("--quality_config", default=None,
                        help="also train this recipe with hf_dino and with the reference's training code (same data "
                             "pipeline) and compare the teachers' k-NN; needs --reference_repo")
    parser.add_argument("--quality_epochs", type=int, default=4)
    parser.add_argument("--quality_seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quality_num_threads", type=int, default=None,
                        help="torch threads per quality run (default: all cores)")
    parser.add_argument("--quality_output_dir", default="/tmp", help="where the quality runs' teachers are saved")
    parser.add_argument("--quality_only", action="store_true", help="skip the speed and memory measurements")
    parser.add_argument("--output_json", default=None)
    args = vars(parser.parse_args())
    reference_repo, rounds, output_json = args.pop("reference_repo"), args.pop("rounds"), args.pop("output_json")
    quality = {name: args.pop(name) for name in ("quality_config", "quality_epochs", "quality_seeds",
                                                 "quality_num_threads", "quality_output_dir")}
    quality_only = args.pop("quality_only")
    if quality["quality_config"] and not reference_repo:
        raise SystemExit("--quality_config needs --reference_repo")
    if quality_only and not quality["quality_config"]:
        raise SystemExit("--quality_only needs --quality_config")
    args.update({name: args[name] == "true" for name, value in vars(defaults).items() if isinstance(value, bool)})
    extra_path = args.pop("reference_pythonpath")
    if reference_repo and extra_path:
        reference_repo = os.pathsep.join([reference_repo, extra_path])
    result = {} if quality_only else run_benchmark(BenchmarkSettings(**args), reference_repo, rounds)
    if quality["quality_config"]:
        result["quality"] = compare_quality(quality["quality_config"], reference_repo, quality["quality_epochs"],
                                            quality["quality_seeds"], output_dir=quality["quality_output_dir"],
                                            num_threads=quality["quality_num_threads"])
    emit_json(result, output_json)


if __name__ == "__main__":
    main()
