"""Weighted k-NN classifier on frozen features (Wu et al. 2018, as used by DINO Sec. 4.1).

For each test feature, take the k most cosine-similar training features; each votes for its
label with weight exp(similarity / T); the class scores rank the predictions (top-1 / top-5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .features import backbone_cls_features, extract_features, knn_feature_fn
from .metrics import topk_accuracy


@torch.no_grad()
def knn_class_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                     k: int, temperature: float, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted k-NN class scores (N_test, C), computed `chunk_size` test rows at a time.

    Features must be L2-normalised: train (N_train, D), test (N_test, D); labels (N_train,).
    Memory is O(chunk_size * N_train), whatever N_test.
    """
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        similarity = test_features[start:start + chunk_size] @ train_features.T  # (n, N_train)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (n, k)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(top_index.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_index], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_evaluate(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (20,), temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024) -> dict[int, dict[str, float]]:
    """{k: {"top1", "top5"}} (percentages) for each k."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    results = {}
    for k in ks:
        scores = knn_class_scores(train_features, train_labels, test_features, k, temperature, num_classes,
                                  chunk_size)
        results[k] = topk_accuracy(scores, test_labels, (1, 5))
    return results


def collate_labelled_fixed_size(samples: list[dict | None], image_shape: tuple[int, int, int]) -> dict:
    """Like `collate_labelled`, but of a fixed batch size, so that batches can be gathered across
    processes: an undecodable image becomes zeros with label -1.
    {"pixel_values": (B, 3, S, S), "labels": (B,) with -1 for undecodable images}."""
    pixel_values = torch.stack([sample["pixel_values"] if sample is not None else torch.zeros(image_shape)
                                for sample in samples])
    labels = torch.tensor([sample["label"] if sample is not None else -1 for sample in samples], dtype=torch.long)
    return {"pixel_values": pixel_values, "labels": labels}


@torch.no_grad()
def extract_features_sharded(model: nn.Module, dataset: torch.utils.data.Dataset, accelerator, image_shape,
                             batch_size: int = 256, num_workers: int = 0, device: torch.device | str = "cpu",
                             feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = backbone_cls_features,
                             ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """`extract_features` split across the processes of `accelerator` (an `accelerate.Accelerator`):
    each process runs the model over its share of the batches, and `gather_for_metrics` puts
    every batch together on every process (dropping the samples repeated to even out the last
    batches). Collective: every process must call it. Returns (features (N, D) L2-normalised
    float32 on the CPU, labels (N,), number of undecodable images, images this process embedded,
    repeats included), the same on every process but the last."""
    from accelerate.data_loader import prepare_data_loader
    from functools import partial

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=partial(collate_labelled_fixed_size, image_shape=image_shape))
    # Sharded without registering with the Accelerator (its checkpoints list the training loader only).
    loader = prepare_data_loader(loader, num_processes=accelerator.num_processes,
                                 process_index=accelerator.process_index, put_on_device=False, even_batches=True)
    was_training = model.training
    model.eval()
    features, labels, embedded_here = [], [], 0
    for batch in loader:
        output = nn.functional.normalize(feature_fn(model, batch["pixel_values"].to(device)).float(), dim=-1)
        embedded_here += int((batch["labels"] >= 0).sum())
        batch_features, batch_labels = accelerator.gather_for_metrics((output, batch["labels"].to(output.device)))
        features.append(batch_features.cpu())
        labels.append(batch_labels.cpu())
    model.train(was_training)
    features, labels = torch.cat(features), torch.cat(labels)
    decodable = labels >= 0
    if not decodable.any():
        raise ValueError("No decodable image in the evaluation data.")
    return features[decodable], labels[decodable], int((~decodable).sum()), embedded_here


@torch.no_grad()
def extract_streamed_features(model: nn.Module, split, transform: Callable, image_column: str, label_column: str,
                              batch_size: int = 256, num_workers: int = 0, device: torch.device | str = "cpu",
                              feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = backbone_cls_features,
                              rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Features of a streamed split (a 🤗 `IterableDataset`, read once), split across `world_size`
    processes by `StreamingLabelledImageDataset`; every process gets all of them, in rank order.
    Collective with several processes. Returns (features (N, D) L2-normalised float32 on the CPU,
    labels (N,), undecodable images over all processes, images this process embedded)."""
    from ..data import StreamingLabelledImageDataset, collate_labelled
    from ..distributed import all_reduce_, gather_rows

    dataset = StreamingLabelledImageDataset(split, transform, image_column, label_column, rank, world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_labelled)
    try:
        features, labels, skipped = extract_features(model, loader, device, "streamed k-NN features",
                                                     feature_fn=feature_fn)
    except ValueError:  # this process's share held no decodable image; another's may
        features, labels, skipped = torch.empty(0, 0), torch.empty(0, dtype=torch.long), 0
    embedded_here = len(labels)
    if world_size > 1:
        width = torch.tensor([features.shape[1]], dtype=torch.long)
        all_reduce_(width, "max")
        features = features if len(features) else torch.empty(0, int(width))
        features, labels = gather_rows(features), gather_rows(labels)
        skipped = int(all_reduce_(torch.tensor([skipped], dtype=torch.long)))
    if len(labels) == 0:
        raise ValueError("No decodable image in the evaluation data.")
    return features, labels, skipped, embedded_here


def knn_evaluate_splits(model: nn.Module, train_split, val_split, *, crop_size: int, ks: Sequence[int] = (20,),
                        temperature: float = 0.07, image_column: str = "image", label_column: str = "label",
                        batch_size: int = 256, num_workers: int = 0, device: torch.device | str = "cpu",
                        max_train_samples: int | None = None, chunk_size: int = 1024,
                        resize_ratio: float = 256 / 224, accelerator=None, feature: str = "cls",
                        n_last_blocks: int | None = None) -> dict:
    """k-NN of a frozen model: `train_split` is the memory bank, `val_split` the queries, both
    resized to crop_size * resize_ratio and centre-cropped to crop_size (the reference's 256/224 by
    default; 1.0 keeps whole low-resolution images such as CIFAR's). Each split is a 🤗 `Dataset`
    or a streamed `IterableDataset` (read once, never materialised). Returns the `eval_knn`
    contract: {"top1", "top5", "k", "temperature", "num_train", "num_val", "num_skipped"} for the
    first k, plus {"per_k": {k: {"top1", "top5"}}, "num_processes", "images_per_process"} (images
    each process embedded, both splits together).

    With an `accelerate.Accelerator` of several processes (`accelerator`), every process extracts
    a shard of the features and all of them get the gathered features and the same result (no
    long phase on one process while the others wait in a collective); the k-NN scoring itself
    runs on every process. Collective then: every process must call it.

    `feature` (with `n_last_blocks`): the readout (`features.knn_feature_fn`), "cls" as the paper."""
    import datasets

    from ..data import LabelledImageDataset, collate_labelled, first_examples
    from ..distributed import gather_counts
    from ..transforms import evaluation_transform

    if max_train_samples is not None:
        train_split = first_examples(train_split, max_train_samples)
    transform = evaluation_transform(crop_size, resize_ratio)
    feature_fn = knn_feature_fn(feature, n_last_blocks, model)
    num_processes = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    extracted, embedded_here = {}, 0
    for name, split in (("train", train_split), ("val", val_split)):
        if isinstance(split, datasets.IterableDataset):
            *extracted[name], embedded = extract_streamed_features(
                model, split, transform, image_column, label_column, batch_size, num_workers, device, feature_fn,
                rank, num_processes)
        elif num_processes > 1:
            dataset = LabelledImageDataset(split, transform, image_column, label_column)
            *extracted[name], embedded = extract_features_sharded(
                model, dataset, accelerator, (3, crop_size, crop_size), batch_size, num_workers, device, feature_fn)
        else:
            dataset = LabelledImageDataset(split, transform, image_column, label_column)
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                                 collate_fn=collate_labelled)
            extracted[name] = extract_features(model, loader, device, f"k-NN {name} features", feature_fn=feature_fn)
            embedded = len(extracted[name][1])
        embedded_here += embedded
    label_feature = (train_split.features or {}).get(label_column)
    num_classes = getattr(label_feature, "num_classes", None)
    (train_features, train_labels, train_skipped), (val_features, val_labels, val_skipped) = extracted.values()
    # gathered features are on the CPU; score where the model runs
    train_features, val_features = train_features.to(device), val_features.to(device)
    train_labels, val_labels = train_labels.to(device), val_labels.to(device)
    per_k = knn_evaluate(train_features, train_labels, val_features, val_labels, ks=ks, temperature=temperature,
                         num_classes=num_classes, chunk_size=chunk_size)
    first = per_k[ks[0]]
    return {"top1": first["top1"], "top5": first["top5"], "k": ks[0], "temperature": temperature, "feature": feature,
            "num_train": len(train_labels), "num_val": len(val_labels), "num_skipped": train_skipped + val_skipped,
            "per_k": {int(k): v for k, v in per_k.items()}, "num_processes": num_processes,
            "images_per_process": gather_counts(embedded_here, num_processes)}


def held_out_knn(model: nn.Module, dataset_dict, *, train_split: str, val_split: str, label_column: str,
                 **knn_arguments) -> dict | None:
    """`knn_evaluate_splits` of `model` with `dataset_dict[train_split]` as the memory bank and the
    held-out split (`val_split`, else the first of validation / test / val / valid) as queries;
    None, with a warning, when the data has no held-out split or no labels. The result also names
    the held-out split (`"split"`)."""
    import logging

    from ..data import FALLBACK_VAL_SPLITS, select_split

    try:
        held_out = select_split(dataset_dict, val_split, fallbacks=FALLBACK_VAL_SPLITS)
        memory_bank = select_split(dataset_dict, train_split)
    except KeyError as error:
        logging.getLogger(__name__).warning("k-NN evaluation skipped: %s", error)
        return None
    if label_column not in (memory_bank.features or {}):
        logging.getLogger(__name__).warning("k-NN evaluation skipped: no %r column", label_column)
        return None
    result = knn_evaluate_splits(model, memory_bank, held_out, label_column=label_column, **knn_arguments)
    result["split"] = str(getattr(held_out, "split", None) or val_split)  # after the fallback
    return result
