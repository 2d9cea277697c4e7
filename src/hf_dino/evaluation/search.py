"""Large-scale feature search for retrieval and copy detection.

- `stream_features`: image files -> features, batch by batch through a DataLoader (only one batch
  of images is ever in memory; the result is an (N, D) float32 matrix).
- `cached_features`: the same, kept in a safetensors file keyed by a fingerprint of the model,
  the preprocessing and the file list, so a second run reads features instead of images.
- `chunked_topk` / `faiss_topk`: the k most similar database rows of every query, the
  similarity computed a block of database rows at a time (a million x thousand matrix never
  exists whole).
- `ranking_positions`: where given database items land in each query's full ranking, again by
  blocks (what revisitop's average precision needs, without materialising the ranking).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SIMILARITY_BUDGET_BYTES = 256 * 2**20  # one block of the query x database similarity


class UnreadableImageError(ValueError):
    """An image file could not be decoded; the message names the file."""


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(path for path in Path(folder).iterdir()
                  if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)


def to_normalised_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, ImageNet mean/std normalised."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (array - mean) / std


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; UnreadableImageError naming the file otherwise."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise UnreadableImageError(f"{path}: cannot read the image ({error}); replace or remove the file") from None


class ImageFileDataset(torch.utils.data.Dataset):
    """item i -> {"pixel_values": (3, H, W), "index": i} or {"error": message, "index": i}."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            return {"pixel_values": self.transform(open_rgb(self.paths[index])), "index": index}
        except UnreadableImageError as error:
            return {"error": str(error), "index": index}


def collate_images(samples: list[dict]) -> dict:
    """{"pixel_values": (B, 3, H, W) or None, "indices": (B,), "errors": [message, ...]}."""
    errors = [sample["error"] for sample in samples if "error" in sample]
    if errors:
        return {"pixel_values": None, "indices": None, "errors": errors}
    return {"pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
            "indices": torch.tensor([sample["index"] for sample in samples]), "errors": []}


@torch.no_grad()
def stream_features(model: nn.Module, paths: Sequence[str | Path], transform: Callable[[Image.Image], torch.Tensor],
                    feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], *, batch_size: int = 1,
                    num_workers: int = 0, device: torch.device | str = "cpu", description: str = "features",
                    disable_progress: bool = False) -> torch.Tensor:
    """Features (N, D) float32 on the CPU of every image, in `paths` order. Images are decoded by
    DataLoader workers one batch at a time; an unreadable file stops the run with
    UnreadableImageError (no partial result)."""
    if not paths:
        raise ValueError(f"{description}: no image to extract features from")
    loader = torch.utils.data.DataLoader(ImageFileDataset(paths, transform), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate_images)
    features = None
    model.eval()
    for batch in tqdm(loader, desc=description, disable=disable_progress, leave=False):
        if batch["errors"]:
            raise UnreadableImageError(batch["errors"][0])
        output = feature_fn(model, batch["pixel_values"].to(device)).float().cpu()
        if features is None:
            features = torch.empty(len(paths), output.shape[-1])
        features[batch["indices"]] = output
    return features


def fingerprint(**parts) -> str:
    """A short stable hash of JSON-serialisable parts (model, preprocessing, file list)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(name_or_path: str) -> dict:
    """The model's identity: its name, plus size and modification time of a local folder's weights."""
    folder = Path(name_or_path)
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    return {"model": str(name_or_path),
            "weights": [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in weights]}


def cached_features(cache_dir: str | Path | None, label: str, key: dict, paths: Sequence[str | Path],
                    compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`compute()` (features of `paths`), or the copy saved under `cache_dir` by an earlier run
    with the same `key` (model, preprocessing) and the same file names. Saves after computing."""
    if cache_dir is None:
        return compute()
    from safetensors.torch import load_file, save_file

    digest = fingerprint(key=key, files=[str(path) for path in paths])
    cache_file = Path(cache_dir) / f"{label.replace('/', '_')}-{digest}.safetensors"
    if cache_file.is_file():
        features = load_file(cache_file)["features"]
        if features.shape[0] == len(paths):
            logger.info("features of %s read from %s", label, cache_file)
            return features
        logger.warning("%s holds %d rows for %d images: recomputing", cache_file, features.shape[0], len(paths))
    features = compute()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(".partial")
    save_file({"features": features.contiguous()}, partial,
              metadata={"label": label, "key": json.dumps(key, sort_keys=True, default=str),
                        "num_images": str(len(paths))})
    partial.replace(cache_file)
    return features


def _rows_per_block(num_queries: int, budget_bytes: int = SIMILARITY_BUDGET_BYTES) -> int:
    return max(1, budget_bytes // (4 * max(1, num_queries)))


@torch.no_grad()
def chunked_topk(queries: torch.Tensor, database: torch.Tensor, k: int,
                 block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products: queries (Q, D), database (N, D) -> (scores (Q, k'), indices (Q, k')),
    k' = min(k, N), best first. The database is scanned `block_size` rows at a time (default:
    256 MiB of similarities), keeping a running top-k."""
    block_size = block_size or _rows_per_block(len(queries))
    k = min(k, len(database))
    best_scores = torch.full((len(queries), 0), float("-inf"))
    best_indices = torch.zeros((len(queries), 0), dtype=torch.long)
    for start in range(0, len(database), block_size):
        block = database[start:start + block_size]
        scores = queries @ block.T  # (Q, block)
        top_scores, top_indices = scores.topk(min(k, block.shape[0]), dim=1)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_indices = torch.cat([best_indices, top_indices + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_indices = merged_indices.gather(1, order)
    return best_scores, best_indices


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_topk(queries: torch.Tensor, database: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as `chunked_topk` with a faiss exact inner-product index (`pip install faiss-cpu`)."""
    import faiss

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database.numpy(), dtype=np.float32))
    scores, indices = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), min(k, len(database)))
    return torch.from_numpy(scores), torch.from_numpy(indices).long()


@torch.no_grad()
def ranking_positions(queries: torch.Tensor, database: torch.Tensor, items: Sequence[np.ndarray],
                      block_size: int | None = None) -> list[np.ndarray]:
    """0-based positions of database rows `items[q]` in query q's ranking of the whole database
    by decreasing inner product (ties: lower database index first), computed block by block:
    position = #rows scoring higher + #rows scoring equal with a lower index (two passes over
    the database: the items' own scores, then the counts).
    queries (Q, D), database (N, D); returns Q int64 arrays aligned with `items`."""
    num_queries = len(queries)
    block_size = block_size or _rows_per_block(num_queries)
    width = max((len(query_items) for query_items in items), default=0)
    item_index = torch.full((num_queries, max(width, 1)), -1, dtype=torch.long)
    for query, query_items in enumerate(items):
        item_index[query, :len(query_items)] = torch.as_tensor(np.asarray(query_items, dtype=np.int64))
    # pass 1: each item's own score, taken from the same block product that pass 2 compares it with
    item_scores = torch.full(item_index.shape, float("inf"))
    for start in range(0, len(database), block_size):
        block = database[start:start + block_size]
        rows, slots = ((item_index >= start) & (item_index < start + len(block))).nonzero(as_tuple=True)
        if len(rows):
            item_scores[rows, slots] = (queries @ block.T)[rows, item_index[rows, slots] - start]
    # pass 2: count the rows ranked before each item
    higher = torch.zeros_like(item_index)
    equal_before = torch.zeros_like(item_index)
    for start in range(0, len(database), block_size):
        block = database[start:start + block_size]
        end = start + len(block)
        scores = queries @ block.T
        ordered = scores.sort(dim=1).values
        at_most = torch.searchsorted(ordered, item_scores, right=True)
        below = torch.searchsorted(ordered, item_scores, right=False)
        higher += len(block) - at_most
        equal = at_most - below
        equal_before += torch.where(item_index >= end, equal, torch.zeros_like(equal))
        inside = (item_index >= start) & (item_index < end) & (equal > 1)
        for query, slot in inside.nonzero().tolist():  # a tie inside the item's own block (duplicates)
            stop = int(item_index[query, slot]) - start
            equal_before[query, slot] += int((scores[query, :stop] == item_scores[query, slot]).sum())
    positions = (higher + equal_before).numpy()
    return [positions[query, :len(query_items)] for query, query_items in enumerate(items)]
