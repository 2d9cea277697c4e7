import math

import pytest
import torch

from hf_dino.evaluation import knn_class_scores, knn_evaluate, load_metric, topk_accuracy


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
