"""Plot a pretraining run's curves: loss, teacher entropy and KL, lr, momentum, temperature, k-NN.

    python scripts/plot_metrics.py OUTPUT_DIR [--output OUTPUT_DIR/metrics.png]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..cli import parse_args, usage_error


@dataclass
class PlotMetricsArguments:
    run: str = field(metadata={"help": "a pretraining output directory or its metrics.jsonl (also positional)"})
    output: str | None = field(default=None, metadata={"help": "PNG path; unset: metrics.png beside metrics.jsonl"})
    log_scale_loss: bool = field(default=False, metadata={"help": "log scale for the loss panel"})


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(PlotMetricsArguments, argv=argv, description=__doc__, positional="run")
    metrics = Path(args.run)
    if metrics.is_dir():
        metrics = metrics / "metrics.jsonl"
    if not metrics.exists():
        usage_error(f"--run {args.run}: {metrics} does not exist; pass a pretraining --output_dir or its metrics.jsonl")
    from ..visualization.plotting import plot_metrics

    output = args.output or str(metrics.with_name("metrics.png"))
    panels = plot_metrics(metrics, output, args.log_scale_loss)
    print(f"Wrote {output} ({', '.join(panels)})")


if __name__ == "__main__":
    main()
