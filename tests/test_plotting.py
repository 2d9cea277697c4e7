import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hf_dino.visualization.plotting import plot_metrics, read_metrics

REPO = Path(__file__).resolve().parents[1]


def write_run(directory: Path) -> Path:
    rows = [{"step": s, "epoch": s / 10, "loss": 6.0 - s / 10, "teacher_entropy": 3.0, "kl_student_teacher": 1.0,
             "lr": 1e-4 * s, "momentum": 0.99, "teacher_temp": 0.04, "weight_decay": 0.04, "img_per_s": 80.0}
            for s in range(10, 60, 10)]
    rows[2]["knn_top1"], rows[2]["knn_top5"] = 30.0, 80.0
    metrics = directory / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    (directory / "recipe.json").write_text(json.dumps({"out_dim": 1024}))
    return metrics


def test_every_logged_metric_gets_a_panel(tmp_path):
    panels = plot_metrics(write_run(tmp_path), tmp_path / "curves.png")
    assert "online k-NN accuracy (%)" in panels and "collapse diagnostics (nats)" in panels and len(panels) == 8
    width, height = Image.open(tmp_path / "curves.png").size
    assert width > 500 and height > 500


def test_panels_without_data_are_left_out(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "out.png") == ["DINO loss"]


def test_a_corrupt_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)


def test_plot_script_on_a_run_directory(tmp_path):
    write_run(tmp_path)
    completed = subprocess.run([sys.executable, str(REPO / "scripts/plot_metrics.py"), str(tmp_path)],
                               capture_output=True, text=True, check=True)
    assert "metrics.png" in completed.stdout and (tmp_path / "metrics.png").stat().st_size > 10_000
