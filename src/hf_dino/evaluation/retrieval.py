"""Landmark image retrieval on the revisited Oxford / Paris layout (the paper's section 4.2).

Layout: `ROOT/NAME/jpg/<name>.jpg` for every name of the ground truth's `imlist` (database) and
`qimlist` (queries), and `ROOT/NAME/gnd_NAME.pkl` (or `.json`, see `revisitop`). As the
reference evaluates it: each image is shrunk so that its longest side is `imsize` (PIL
thumbnail, Lanczos; never enlarged), run alone (batch 1), queries whole (not cropped to their
box); the feature is the CLS token after the final norm, or with `multiscale` the mean of the
CLS at scales 1, 1/sqrt(2), 1/2 (bilinear resize of the normalised image tensor) divided by its
norm; features are L2-normalised and ranked by cosine similarity.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .features import backbone_cls_features
from .revisitop import GroundTruth, find_ground_truth, load_ground_truth, map_from_positions
from .search import cached_features, ranking_positions, stream_features, to_normalised_tensor

KAPPAS = (1, 5, 10)
MULTISCALE_FACTORS = (1.0, 1 / math.sqrt(2), 0.5)


class ThumbnailTransform:
    """PIL RGB image -> (3, h, w) normalised tensor with max(h, w) <= imsize (aspect kept)."""

    def __init__(self, imsize: int):
        self.imsize = imsize

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.copy()
        image.thumbnail((self.imsize, self.imsize), Image.Resampling.LANCZOS)
        return to_normalised_tensor(image)


def cls_feature(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D) CLS feature."""
    return backbone_cls_features(model, pixel_values)


def multiscale_cls_feature(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) -> (1, D): the CLS summed over scales 1, 1/sqrt(2), 1/2 (bilinear), divided by 3
    and by its norm."""
    total = None
    for factor in MULTISCALE_FACTORS:
        scaled = pixel_values if factor == 1.0 else nn.functional.interpolate(
            pixel_values, scale_factor=factor, mode="bilinear", align_corners=False)
        feature = backbone_cls_features(model, scaled)
        total = feature if total is None else total + feature
    total = total / len(MULTISCALE_FACTORS)
    return total / total.norm()


def dataset_files(data_path: str | Path, dataset: str) -> tuple[GroundTruth, list[Path], list[Path]]:
    """Ground truth and the query / database image paths, every named image checked to exist."""
    dataset_dir = Path(data_path) / dataset
    ground_truth = load_ground_truth(find_ground_truth(dataset_dir, dataset))
    images_dir = dataset_dir / "jpg"
    queries = [images_dir / f"{name}.jpg" for name in ground_truth.qimlist]
    database = [images_dir / f"{name}.jpg" for name in ground_truth.imlist]
    missing = sorted({str(path) for path in queries + database if not path.is_file()})
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{ground_truth.source} names {len(missing)} image(s) missing from {images_dir}: "
                                f"{listed}")
    if not database:
        raise ValueError(f"{ground_truth.source}: the database list 'imlist' is empty")
    return ground_truth, queries, database


def retrieval_scores(query_features: torch.Tensor, database_features: torch.Tensor,
                     ground_truth: GroundTruth, block_size: int | None = None) -> dict:
    """L2-normalised features: queries (Q, D), database (N, D) -> the JSON scores in percent:
    mAP_E, mAP_M, mAP_H, mP@k_M and mP@k_H for k in 1, 5, 10."""
    query_features = nn.functional.normalize(query_features, dim=1)
    database_features = nn.functional.normalize(database_features, dim=1)
    labelled = [np.unique(np.concatenate([entry["easy"], entry["hard"], entry["junk"]])) for entry in ground_truth.gnd]
    positions = ranking_positions(query_features, database_features, labelled, block_size=block_size)
    result = {}
    for protocol in ("E", "M", "H"):
        protocol_gnd = ground_truth.protocol(protocol)
        found = []
        for entry, items, item_positions in zip(protocol_gnd, labelled, positions):
            lookup = dict(zip(items.tolist(), item_positions.tolist()))
            found.append({key: np.array([lookup[int(i)] for i in entry[key]], dtype=np.int64)
                          for key in ("ok", "junk")})
        scores = map_from_positions(found, protocol_gnd, KAPPAS)
        result[f"mAP_{protocol}"] = round(100 * scores["mAP"], 2)
        if protocol != "E":
            for kappa, precision in zip(KAPPAS, scores["mP"]):
                result[f"mP@{kappa}_{protocol}"] = round(100 * float(precision), 2)
    return result


def evaluate_retrieval(model: nn.Module, data_path: str | Path, dataset: str, *, imsize: int = 224,
                       multiscale: bool = False, device: torch.device | str = "cpu", num_workers: int = 0,
                       features_cache: str | Path | None = None, model_key: dict | None = None,
                       disable_progress: bool = False) -> dict:
    """The `eval_image_retrieval` JSON: scores plus dataset, num_queries, num_database."""
    ground_truth, query_paths, database_paths = dataset_files(data_path, dataset)
    transform = ThumbnailTransform(imsize)
    feature_fn = multiscale_cls_feature if multiscale else cls_feature
    key = {"model": model_key or repr(type(model)), "imsize": imsize, "multiscale": multiscale,
           "feature": "retrieval-cls"}

    def features_of(paths: list[Path], split: str) -> torch.Tensor:
        return cached_features(features_cache, f"{dataset}_{split}", key, paths, lambda: stream_features(
            model, paths, transform, feature_fn, batch_size=1, num_workers=num_workers, device=device,
            description=f"{dataset} {split}", disable_progress=disable_progress))

    database_features = features_of(database_paths, "database")
    query_features = features_of(query_paths, "queries")
    result = {"dataset": dataset, "num_queries": len(query_paths), "num_database": len(database_paths)}
    result.update(retrieval_scores(query_features, database_features, ground_truth))
    return result
