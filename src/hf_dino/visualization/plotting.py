"""Training curves of a pretraining run, drawn from its `metrics.jsonl`."""

from __future__ import annotations

import json
import math
from pathlib import Path

# (panel title, metrics drawn in it); a panel is skipped when none of its metrics was logged.
PANELS = (
    ("DINO loss", ("loss",)),
    ("collapse diagnostics (nats)", ("teacher_entropy", "kl_student_teacher")),
    ("learning rate", ("lr",)),
    ("teacher momentum", ("momentum",)),
    ("teacher temperature", ("teacher_temp",)),
    ("weight decay", ("weight_decay",)),
    ("online k-NN accuracy (%)", ("knn_top1", "knn_top5")),
    ("throughput (img/s)", ("img_per_s",)),
)


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl, one per line (blank lines ignored)."""
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not a JSON object: {error}") from None
    if not rows:
        raise ValueError(f"{path} holds no metrics yet")
    return rows


def plot_metrics(metrics_path: str | Path, output_path: str | Path, log_scale_loss: bool = False) -> list[str]:
    """Draw every panel of `PANELS` that has data to a PNG; returns the panel titles drawn.

    The loss panel marks ln(K) when `out_dim` is known from a `recipe.json` beside the metrics
    (a loss stuck there means the teacher collapsed to uniform outputs).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    panels = [(title, [name for name in names if any(name in row for row in rows)]) for title, names in PANELS]
    panels = [(title, names) for title, names in panels if names]
    columns = 2
    figure, axes = plt.subplots(-(-len(panels) // columns), columns, figsize=(11, 3 * -(-len(panels) // columns)),
                                squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.axis("off")
    recipe_path = Path(metrics_path).with_name("recipe.json")
    out_dim = json.loads(recipe_path.read_text()).get("out_dim") if recipe_path.exists() else None
    for axis, (title, names) in zip(axes.flat, panels):
        for name in names:
            points = [(row["step"], row[name]) for row in rows if name in row and row[name] is not None]
            axis.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=name)
        if title == "DINO loss" and out_dim:
            axis.axhline(math.log(out_dim), color="grey", linestyle="--", label=f"ln K = {math.log(out_dim):.2f}")
            if log_scale_loss:
                axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(names) > 1 or title == "DINO loss":
            axis.legend(fontsize=8)
    figure.tight_layout()
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_path, dpi=100)
    plt.close(figure)
    return [title for title, _ in panels]
