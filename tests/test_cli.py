"""The evaluation scripts' command lines (flags, one-line errors, exit code 2) and the keys of their
JSON results, on the embedded demo data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import ViTModel

from hf_dino.configuration_dino import build_backbone_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("backbone")
    ViTModel(build_backbone_config("vit_tiny", 8, 32, num_hidden_layers=2)).save_pretrained(directory)
    return directory


def run_script(name, *args):
    completed = subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)],
                               capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed


def test_eval_knn_contract(tiny_backbone, tmp_path):
    run_script("eval_knn.py", "--model", tiny_backbone, "--max_train_samples", 200, "--max_val_samples", 50,
               "--k", 10, 20, "--num_workers", 0, "--output_json", tmp_path / "knn.json")
    result = json.loads((tmp_path / "knn.json").read_text())
    assert {"top1", "top5", "k", "temperature", "num_train", "num_val"} <= set(result)
    assert (result["k"], result["num_train"], result["num_val"]) == (10, 200, 50)
    assert set(result["per_k"]) == {"10", "20"}


def test_eval_linear_contract(tiny_backbone, tmp_path):
    run_script("eval_linear.py", "--model", tiny_backbone, "--max_train_samples", 128, "--max_val_samples", 64,
               "--epochs", 2, "--batch_size", 64, "--lr", 0.01, 0.1, "--num_workers", 0,
               "--output_json", tmp_path / "linear.json", "--output_dir", tmp_path / "probe")
    result = json.loads((tmp_path / "linear.json").read_text())
    assert {"top1", "top5", "best_top1", "best_epoch", "lr", "per_lr"} <= set(result)
    assert (result["num_train"], result["num_val"], result["n_last_blocks"]) == (128, 64, 2)
    assert (tmp_path / "probe" / "linear_classifier.safetensors").exists()


@pytest.mark.parametrize("command", ["eval_knn", "eval_linear", "visualize_attention"])
def test_a_model_that_cannot_be_loaded_is_one_usage_error(command, tmp_path, capsys):
    """A --model that does not exist: exit code 2, one line naming --model, nothing written."""
    import importlib

    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    missing = tmp_path / "no_such_model"
    extra = {"visualize_attention": ["--image", str(tmp_path / "photo.png"), "--output_dir", str(tmp_path / "out")],
             "eval_linear": ["--output_json", str(tmp_path / "out" / "r.json")],
             "eval_knn": ["--output_json", str(tmp_path / "out" / "r.json")]}[command]
    main = importlib.import_module(f"hf_dino.commands.{command}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(missing), *extra])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: --model {missing}: ") and message.count("\n") == 1, message
    assert not (tmp_path / "out").exists()
