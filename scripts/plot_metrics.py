#!/usr/bin/env python
"""Plot a pretraining run's curves: loss, teacher entropy and KL, lr, momentum, temperature, k-NN.

python scripts/plot_metrics.py OUTPUT_DIR [--output OUTPUT_DIR/metrics.png]
"""

import argparse
from pathlib import Path

from hf_dino.plotting import plot_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a pretraining output directory, or its metrics.jsonl")
    parser.add_argument("--output", default=None, help="PNG path (default: metrics.png beside metrics.jsonl)")
    parser.add_argument("--log_scale_loss", action="store_true")
    args = parser.parse_args()
    metrics = Path(args.run)
    if metrics.is_dir():
        metrics = metrics / "metrics.jsonl"
    if not metrics.exists():
        raise SystemExit(f"{metrics} does not exist: pass a pretraining --output_dir or its metrics.jsonl")
    output = args.output or metrics.with_name("metrics.png")
    panels = plot_metrics(metrics, output, args.log_scale_loss)
    print(f"Wrote {output} ({', '.join(panels)})")


if __name__ == "__main__":
    main()
