"""Copy detection on the Copydays layout (the paper's section 4.2).

Layout: `ROOT/original/*.jpg` (the database), `ROOT/strong/*.jpg` (queries), optionally
`ROOT/jpegqual/N/` and `ROOT/crops/N/` (more query blocks) and `ROOT/distractors/` (added to the
database). Copydays naming: an original `GGGG00.jpg`, its copies `GGGGkk.jpg`; a query's
positives are the originals whose name shares its first four characters.

As the reference: images resized to an exact `imsize` square (bicubic); feature = the CLS token
concatenated with GeM (p = 4) of the last-layer patch tokens (after the final norm); with a
whitening set, features centred by that set's mean and multiplied by the PCA-whitening of its
uncentred covariance (eigenvalues ** -0.5); L2-normalised; cosine similarity; average precision
over the 20 best results (the Holidays evaluation rule), averaged per query block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .search import (cached_features, chunked_topk, faiss_topk, list_images, stream_features,
                     to_normalised_tensor)

TOP_K = 20
GEM_POWER = 4.0


class SquareResize:
    """PIL RGB image -> (3, imsize, imsize) normalised tensor (bicubic, aspect not kept)."""

    def __init__(self, imsize: int):
        self.imsize = imsize

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_normalised_tensor(image.resize((self.imsize, self.imsize), Image.Resampling.BICUBIC))


def gem(tokens: torch.Tensor, power: float = GEM_POWER, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean over tokens: (B, T, D) -> (B, D) = mean_t(max(x, eps) ** p) ** (1 / p)."""
    return tokens.clamp(min=eps).pow(power).mean(dim=1).pow(1.0 / power)


def last_hidden_state(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1 + T, D) tokens after the final norm of a ViT (`ViTModel` or the
    backbone of a `DinoModel`)."""
    vit = getattr(model, "backbone", model)
    if getattr(vit.config, "model_type", None) != "vit":
        raise ValueError("copy detection needs a ViT backbone (CLS and patch tokens)")
    return vit(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state


def cls_gem_feature(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 2 D): [CLS, GeM_4(patch tokens)]."""
    tokens = last_hidden_state(model, pixel_values)
    return torch.cat([tokens[:, 0], gem(tokens[:, 1:])], dim=1)


@dataclass
class Whitening:
    """x -> (x - mean) @ projection.T, projection = diag(eigenvalues ** -power) @ eigenvectors.T."""

    mean: torch.Tensor  # (D,)
    projection: torch.Tensor  # (D, D)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) @ self.projection.T


def fit_whitening(features: torch.Tensor, power: float = 0.5, relative_floor: float = 1e-5) -> Whitening:
    """PCA whitening fitted on features (N, D) as the reference fits it: the mean of the set for
    centring, the uncentred second moment X^T X / N for the eigen-decomposition (float64),
    eigenvalues floored at max * 1e-5, scaled by eigenvalue ** -power."""
    features64 = features.double()
    second_moment = features64.T @ features64 / len(features64)
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment)
    eigenvalues = eigenvalues.clamp(min=float(eigenvalues.max()) * relative_floor)
    order = eigenvalues.argsort(descending=True)
    projection = torch.diag(eigenvalues[order] ** -power) @ eigenvectors[:, order].T
    return Whitening(mean=features.mean(dim=0), projection=projection.float())


def holidays_average_precision(positive_ranks: list[int], num_positives: int) -> float:
    """Trapezoidal AP from the 0-based ranks (ascending) of the positives found in the returned list;
    positives not returned add nothing (recall step 1 / num_positives)."""
    ap = 0.0
    for found, rank in enumerate(positive_ranks):
        precision_before = 1.0 if rank == 0 else found / rank
        precision_after = (found + 1) / (rank + 1)
        ap += (precision_before + precision_after) / (2.0 * num_positives)
    return ap


def block_mean_average_precision(result_indices: torch.Tensor, positives: list[set[int]]) -> float:
    """result_indices (Q, k) database indices best first; positives: Q sets of database indices."""
    total = 0.0
    for row, query_positives in zip(result_indices.tolist(), positives):
        ranks = [rank for rank, index in enumerate(row) if index in query_positives]
        total += holidays_average_precision(ranks, len(query_positives))
    return total / len(positives)


@dataclass
class CopydaysLayout:
    """Image paths of a Copydays folder: originals, query blocks (name -> paths), distractors."""

    originals: list[Path]
    query_blocks: dict[str, list[Path]] = field(default_factory=dict)
    distractors: list[Path] = field(default_factory=list)

    def positives(self, block: str) -> list[set[int]]:
        """Per query of `block`: indices of the originals sharing its first four characters."""
        by_prefix: dict[str, set[int]] = {}
        for index, path in enumerate(self.originals):
            by_prefix.setdefault(path.name[:4], set()).add(index)
        found = []
        for path in self.query_blocks[block]:
            if path.name[:4] not in by_prefix:
                raise ValueError(f"{path}: no original shares its first four characters "
                                 f"'{path.name[:4]}' (Copydays naming GGGGkk.jpg)")
            found.append(by_prefix[path.name[:4]])
        return found


def numeric_subfolders(folder: Path) -> list[Path]:
    return sorted((path for path in folder.iterdir() if path.is_dir() and path.name.isdigit()),
                  key=lambda path: int(path.name)) if folder.is_dir() else []


def read_layout(root: str | Path, distractors: str | Path | None = None) -> CopydaysLayout:
    """Find the blocks of a Copydays folder; FileNotFoundError / ValueError naming what is missing."""
    root = Path(root)
    for required in ("original", "strong"):
        if not (root / required).is_dir():
            raise FileNotFoundError(f"{root / required}: no such folder (Copydays layout: original/, strong/)")
    layout = CopydaysLayout(originals=list_images(root / "original"))
    blocks = [root / "strong"] + numeric_subfolders(root / "jpegqual") + numeric_subfolders(root / "crops")
    for folder in blocks:
        layout.query_blocks[folder.relative_to(root).as_posix()] = list_images(folder)
    distractor_dir = Path(distractors) if distractors else root / "distractors"
    if distractors and not distractor_dir.is_dir():
        raise FileNotFoundError(f"{distractor_dir}: no such folder of distractor images")
    if distractor_dir.is_dir():
        layout.distractors = list_images(distractor_dir)
    for name, paths in [("original", layout.originals), *layout.query_blocks.items()]:
        if not paths:
            raise ValueError(f"{root / name}: no image (.jpg, .png, ...) in this folder")
    return layout


def evaluate_copy_detection(model: nn.Module, data_path: str | Path, *, imsize: int = 320,
                            whitening_data: str | Path | None = None, distractors: str | Path | None = None,
                            batch_size: int = 16, num_workers: int = 0, device: torch.device | str = "cpu",
                            features_cache: str | Path | None = None, model_key: dict | None = None,
                            search_backend: str = "torch", disable_progress: bool = False) -> dict:
    """The `eval_copy_detection` JSON (percent): mAP (strong), mAP_<block> for the other blocks,
    plus num_database, num_distractors, num_whitening, num_queries (per block)."""
    layout = read_layout(data_path, distractors)
    positives = {block: layout.positives(block) for block in layout.query_blocks}
    whitening_paths = []
    if whitening_data is not None:
        whitening_paths = list_images(whitening_data)
        if not whitening_paths:
            raise ValueError(f"{whitening_data}: no image to fit the whitening on")
    transform = SquareResize(imsize)
    key = {"model": model_key or repr(type(model)), "imsize": imsize, "feature": "cls+gem4"}

    def features_of(paths: list[Path], label: str) -> torch.Tensor:
        return cached_features(features_cache, label, key, paths, lambda: stream_features(
            model, paths, transform, cls_gem_feature, batch_size=batch_size, num_workers=num_workers,
            device=device, description=label, disable_progress=disable_progress))

    database = features_of(layout.originals, "original")
    if layout.distractors:
        database = torch.cat([database, features_of(layout.distractors, "distractors")])
    queries = {block: features_of(paths, block) for block, paths in layout.query_blocks.items()}
    if whitening_paths:
        whiten = fit_whitening(features_of(whitening_paths, "whitening"))
        database = whiten(database)
        queries = {block: whiten(features) for block, features in queries.items()}
    database = nn.functional.normalize(database, dim=1)
    search = faiss_topk if search_backend == "faiss" else chunked_topk
    result = {}
    for block, features in queries.items():
        _, indices = search(nn.functional.normalize(features, dim=1), database, TOP_K)
        score = round(100 * block_mean_average_precision(indices, positives[block]), 2)
        result["mAP" if block == "strong" else f"mAP_{block}"] = score
    result.update({"num_database": len(database), "num_distractors": len(layout.distractors),
                   "num_whitening": len(whitening_paths),
                   "num_queries": {block: len(paths) for block, paths in layout.query_blocks.items()}})
    return result
