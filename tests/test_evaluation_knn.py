import json
import math
from pathlib import Path

import pytest
import torch

import conftest

from hf_dino.evaluation import knn_class_scores, knn_evaluate, load_metric, topk_accuracy

ROOT = Path(__file__).resolve().parents[1]


def brute_force_knn(train, train_labels, test, test_labels, k, temperature, num_classes):
    """Full similarity matrix and explicit per-sample voting loops."""
    similarity = test @ train.T
    top1 = top5 = 0
    for i in range(test.shape[0]):
        order = sorted(range(train.shape[0]), key=lambda j: -similarity[i, j].item())[:k]
        votes = [0.0] * num_classes
        for j in order:
            votes[int(train_labels[j])] += math.exp(similarity[i, j].item() / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        top1 += ranking[0] == int(test_labels[i])
        top5 += int(test_labels[i]) in ranking[:5]
    n = test.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n


def random_problem(seed, n_train=120, n_test=37, dim=16, num_classes=7):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator)
    train_labels = torch.randint(num_classes, (n_train,), generator=generator)
    test_labels = torch.randint(num_classes, (n_test,), generator=generator)
    train = torch.nn.functional.normalize(centres[train_labels] + torch.randn(n_train, dim, generator=generator), dim=1)
    test = torch.nn.functional.normalize(centres[test_labels] + torch.randn(n_test, dim, generator=generator), dim=1)
    return train.double(), train_labels, test.double(), test_labels


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_brute_force(k):
    train, train_labels, test, test_labels = random_problem(k)
    result = knn_evaluate(train, train_labels, test, test_labels, ks=(k,), temperature=0.07, num_classes=7)
    top1, top5 = brute_force_knn(train, train_labels, test, test_labels, k, 0.07, 7)
    assert result[k]["top1"] == pytest.approx(top1)
    assert result[k]["top5"] == pytest.approx(top5)
    assert 0 < result[k]["top1"] < 100  # a real, non-trivial problem


def test_knn_invariant_to_chunk_size():
    train, train_labels, test, test_labels = random_problem(3)
    reference = knn_class_scores(train, train_labels, test, 20, 0.07, 7, chunk_size=1000)
    for chunk_size in (1, 5, 36):
        torch.testing.assert_close(knn_class_scores(train, train_labels, test, 20, 0.07, 7, chunk_size), reference)


def test_several_k_in_one_call():
    train, train_labels, test, test_labels = random_problem(4)
    results = knn_evaluate(train, train_labels, test, test_labels, ks=(10, 20, 100), temperature=0.07, num_classes=7)
    assert sorted(results) == [10, 20, 100]


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    result = topk_accuracy(scores, labels, (1, 2))
    assert result["top1"] == pytest.approx(100 / 3)
    assert result["top2"] == pytest.approx(200 / 3)


def test_packaged_metrics_load_offline_and_match_counts(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predictions, references = [3, 1, 2, 2, 0], [3, 1, 0, 2, 1]
    assert load_metric("accuracy").compute(predictions=predictions, references=references) == {"accuracy": 3 / 5}
    ranked = [[0, 1, 2], [2, 1, 0], [1, 0, 2], [2, 0, 1]]
    result = load_metric("top_k_accuracy").compute(predictions=ranked, references=[0, 0, 2, 1], k=[1, 2, 3])
    assert result == {"top1": 1 / 4, "top2": 1 / 4, "top3": 4 / 4}


def test_unknown_metric_names_the_shipped_ones():
    with pytest.raises(ValueError, match="accuracy, top_k_accuracy"):
        load_metric("f1")


def test_topk_with_fewer_classes_than_k():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    result = topk_accuracy(scores, torch.tensor([0, 1]), (1, 5))
    assert result == {"top1": 0.0, "top5": 100.0}


STREAMED_KNN_WORKER = r'''
import json, sys
from accelerate import Accelerator
from transformers import ViTModel
from hf_dino.data import load_dataset_dict
from hf_dino.evaluation.knn import knn_evaluate_splits

accelerator = Accelerator(cpu=True)
model = ViTModel.from_pretrained(sys.argv[1])
splits = load_dataset_dict(sys.argv[2], streaming=True)
result = knn_evaluate_splits(model, splits["train"], splits["test"], crop_size=16, ks=(3, 5), resize_ratio=1.0,
                             batch_size=4, accelerator=accelerator)
# one file per process: the two processes share stdout, where their lines may run together
with open(f"{sys.argv[3]}/knn-rank{accelerator.process_index}.json", "w") as output:
    json.dump(result, output)
'''


def write_labelled_images(folder, sizes: dict[str, int], broken: dict[str, list[int]]) -> None:
    """Parquet splits of small coloured PNGs (3 classes, colour follows the class), some broken."""
    import io

    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    folder.mkdir(parents=True)
    for split, size in sizes.items():
        labels = [i % 3 for i in range(size)]
        images = []
        for index, label in enumerate(labels):
            if index in broken[split]:
                images.append({"bytes": b"broken", "path": None})
                continue
            pixels = np.clip(rng.normal(60 + 60 * label, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(folder / f"{split}.parquet"))


def run_two_processes(command: list[str], timeout: float = 300) -> None:
    """Run `command` (two processes) under a hard timeout; fail with its stderr if it fails."""
    completed = conftest.run_with_timeout(command, timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.fixture
def knn_data_and_model(tmp_path):
    """37 + 23 images (3 undecodable), a tiny ViT, and the one-process k-NN of both."""
    from hf_dino.data import load_dataset_dict
    from hf_dino.evaluation.knn import knn_evaluate_splits

    write_labelled_images(tmp_path / "data", {"train": 37, "test": 23}, {"train": [5, 30], "test": [22]})
    model = conftest.tiny_vit(save_to=tmp_path / "model")
    splits = load_dataset_dict(str(tmp_path / "data"))
    expected = knn_evaluate_splits(model, splits["train"], splits["test"], crop_size=16, ks=(3, 5),
                                   resize_ratio=1.0, batch_size=4)
    assert expected["num_train"] == 35 and expected["num_val"] == 22 and expected["num_skipped"] == 3
    assert expected["num_processes"] == 1 and expected["images_per_process"] == [35 + 22]
    return tmp_path / "data", tmp_path / "model", expected


@pytest.mark.slow
def test_eval_knn_on_two_processes_gives_the_one_process_result(tmp_path, knn_data_and_model):
    """`accelerate launch --multi_gpu --num_processes 2 scripts/eval_knn.py`: each process embeds its half
    (37 and 23 images in batches of 4, the last global batches evened out with repeated samples,
    which gather_for_metrics drops); the JSON is the one-process result, written once, with the
    process count and the images each process embedded."""
    import sys

    data, model, expected = knn_data_and_model
    output = tmp_path / "knn.json"
    run_two_processes([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       str(ROOT / "scripts" / "eval_knn.py"), "--model", str(model), "--dataset_name", str(data),
                       "--val_split", "test", "--k", "3", "5", "--image_size", "16", "--resize_ratio", "1.0",
                       "--batch_size", "4", "--num_workers", "0", "--output_json", str(output)])
    result = json.loads(output.read_text())
    assert {k: result[k] for k in ("num_train", "num_val", "num_skipped")} == {"num_train": 35, "num_val": 22,
                                                                               "num_skipped": 3}
    assert result["per_k"] == {str(k): v for k, v in expected["per_k"].items()}
    assert result["num_processes"] == 2
    # decodable images embedded by each process, the repeats that even out each split's last batch (< 4 per
    # split) included
    assert min(result["images_per_process"]) > 0 and 35 + 22 <= sum(result["images_per_process"]) <= 35 + 22 + 2 * 3


@pytest.mark.slow
def test_streamed_knn_on_two_processes_gives_the_one_process_result(tmp_path, knn_data_and_model):
    """Streamed splits (never materialised), split across 2 processes: both get the one-process
    result; each process embeds its own images only."""
    import sys

    data, model, expected = knn_data_and_model
    worker = tmp_path / "worker.py"
    worker.write_text(STREAMED_KNN_WORKER)
    run_two_processes([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                       str(model), str(data), str(tmp_path)])
    results = {rank: json.loads((tmp_path / f"knn-rank{rank}.json").read_text()) for rank in ("0", "1")
               if (tmp_path / f"knn-rank{rank}.json").exists()}
    assert set(results) == {"0", "1"}
    for result in results.values():
        assert {k: result[k] for k in ("num_train", "num_val", "num_skipped")} == {"num_train": 35, "num_val": 22,
                                                                                   "num_skipped": 3}
        assert result["per_k"] == {str(k): v for k, v in expected["per_k"].items()}
        assert result["num_processes"] == 2 and sum(result["images_per_process"]) == 35 + 22


def test_fixed_size_collate_keeps_undecodable_slots_as_label_minus_one():
    from hf_dino.evaluation.knn import collate_labelled_fixed_size

    good = {"pixel_values": torch.ones(3, 4, 4), "label": 2}
    batch = collate_labelled_fixed_size([good, None, good], image_shape=(3, 4, 4))
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["labels"].tolist() == [2, -1, 2]
    assert batch["pixel_values"][1].abs().sum() == 0
