#!/usr/bin/env python
"""Training-step and multi-crop throughput, peak memory and MFU of hf_dino, optionally against
facebookresearch/dino (a local checkout) in the same run, with ratios (hf_dino / reference).

    python scripts/benchmark.py --output_json bench.json --reference_repo /path/to/dino
    python scripts/benchmark.py --arch vit_tiny --num_hidden_layers 4 --patch_size 8 --global_crop_size 32 \\
        --local_crop_size 16 --local_crops_number 4 --batch_size 64 --out_dim 1024   # the CPU demo's model

The harness lives in benchmarks/training_step.py (a checkout's, not the installed library's).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.training_step import BenchmarkSettings, compare_quality, run_benchmark  # noqa: E402
from hf_dino.cli import emit_json, parse_args, usage_error  # noqa: E402


@dataclass
class BenchmarkRunArguments:
    reference_repo: str | None = field(default=None, metadata={"help": "local checkout of facebookresearch/dino"})
    reference_pythonpath: str | None = field(default=None, metadata={
        "help": "extra import path for the reference only (e.g. where its torchvision is installed)"})
    rounds: int = field(default=1, metadata={"help": "alternate the implementations this many times, keep the best"})
    quality_config: str | None = field(default=None, metadata={
        "help": "also train this recipe with hf_dino and with the reference's training code (same data pipeline) "
                "and compare the teachers' k-NN; needs --reference_repo"})
    quality_epochs: int = field(default=4, metadata={"help": "epochs of each quality run"})
    quality_seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "seeds of the quality runs"})
    quality_num_threads: int | None = field(default=None, metadata={
        "help": "torch threads per quality run (default: all cores)"})
    quality_output_dir: str = field(default="/tmp", metadata={"help": "where the quality runs' teachers are saved"})
    quality_only: bool = field(default=False, metadata={"help": "skip the speed and memory measurements"})
    output_json: str | None = field(default=None, metadata={"help": "also write the result JSON here"})

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"--rounds {self.rounds}: must be >= 1")


def main(argv: list[str] | None = None) -> None:
    settings, run = parse_args(BenchmarkSettings, BenchmarkRunArguments, argv=argv, description=__doc__)
    if run.quality_config and not run.reference_repo:
        usage_error("--quality_config needs --reference_repo")
    if run.quality_only and not run.quality_config:
        usage_error("--quality_only needs --quality_config")
    reference_repo = run.reference_repo
    if reference_repo and run.reference_pythonpath:
        reference_repo = ":".join([reference_repo, run.reference_pythonpath])
    result = {} if run.quality_only else run_benchmark(settings, reference_repo, run.rounds)
    if run.quality_config:
        result["quality"] = compare_quality(run.quality_config, reference_repo, run.quality_epochs, run.quality_seeds,
                                            output_dir=run.quality_output_dir, num_threads=run.quality_num_threads)
    emit_json(result, run.output_json)


if __name__ == "__main__":
    main()
