"""Image datasets for pretraining and evaluation, read with 🤗 datasets.

`--dataset_name` may be a Hub id, a local directory (image folder, or parquet/arrow files
named by split), or a file glob. Images are decoded here rather than by `datasets`, so a
corrupt file is skipped and counted instead of crashing a worker.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import io
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageFile

logger = logging.getLogger(__name__)

DEMO_DATASET_DIR = Path(__file__).parent / "demo_data" / "cifar10"
FALLBACK_VAL_SPLITS = ("validation", "test", "val", "valid")
# Images with more pixels are skipped from their header, before any decoding (`max_image_pixels`):
# a 30000 x 30000 PNG of 100 kB would otherwise take 2.7 GB in a DataLoader worker. Pillow's own
# guard (`PIL.Image.MAX_IMAGE_PIXELS`) is left as Pillow sets it.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False

_EXTENSION_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def load_dataset_dict(dataset_name: str | os.PathLike | None, streaming: bool = False,
                      config_name: str | None = None) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Load every split of `dataset_name` (None: the embedded CIFAR-10 demo sample); `config_name`
    is a Hub dataset's configuration (`--dataset_config_name`)."""
    if dataset_name is None:
        dataset_name = DEMO_DATASET_DIR
    dataset_name = os.path.expanduser(str(dataset_name))
    if any(char in dataset_name for char in "*?["):
        files = sorted(globlib.glob(dataset_name))
        if not files:
            raise FileNotFoundError(f"--dataset_name {dataset_name!r}: the glob matches no file.")
        builder = _EXTENSION_BUILDERS.get(Path(files[0]).suffix, "imagefolder")
        return datasets.load_dataset(builder, data_files={"train": files}, streaming=streaming)
    if looks_like_local_path(dataset_name) and not os.path.exists(dataset_name):
        raise FileNotFoundError(
            f"--dataset_name {dataset_name!r} does not exist. Give a Hub dataset id, a local directory "
            "(image folder or parquet files named by split) or a file glob.")
    return datasets.load_dataset(dataset_name, config_name, streaming=streaming)


def looks_like_local_path(name: str) -> bool:
    """True for names that can only mean a local path: absolute, relative (./, ../, ~) or with more
    than one '/' (a Hub id is `name` or `org/name`). Globs and existing paths count too."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or any(c in name for c in "*?[")
            or os.path.exists(name))


def select_split(dataset_dict, split: str, *, fallbacks: tuple[str, ...] = ()) -> Any:
    """Return `dataset_dict[split]`, else the first present split among `fallbacks`."""
    for name in (split, *fallbacks):
        if name in dataset_dict:
            return dataset_dict[name]
    raise KeyError(f"Split {split!r} not found (available: {', '.join(dataset_dict)}); "
                   "choose one with --train_split / --val_split.")


def first_examples(split, count: int):
    """The first `count` examples of a split: a 🤗 `Dataset` (all of them when it holds fewer) or a
    streamed `IterableDataset` (read lazily)."""
    import datasets

    if isinstance(split, datasets.IterableDataset):
        return split.take(count)
    return split.select(range(min(count, len(split))))


def prepare_image_column(dataset, image_column: str):
    """Turn off 🤗 datasets' decoding of `image_column` so that bad images can be skipped here."""
    features = dataset.features
    if features is not None and image_column not in features:
        raise KeyError(f"--image_column {image_column!r} not in the dataset's columns "
                       f"({', '.join(features)}); pass the right --image_column.")
    if features is not None and isinstance(features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def decode_image(value: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray | None:
    """Decode an image cell to a uint8 RGB array (H, W, 3), or None when it cannot be read or holds
    more than `max_pixels` pixels (`read_image`)."""
    return read_image(value, max_pixels)[0]


def read_image(value: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray | None, str | None]:
    """(uint8 RGB array (H, W, 3), None), or (None, why the image was skipped).

    Accepts a `datasets.Image(decode=False)` dict (`bytes` and/or `path`), raw bytes, a path or a
    PIL image. An image of more than `max_pixels` pixels (None: no budget) is refused from its
    header, before its pixels are decoded. Grayscale, 16-bit, palette, CMYK and RGBA images are
    converted to RGB (transparency composited on white).
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        else:
            if isinstance(value, dict):
                data, path = value.get("bytes"), value.get("path")
            elif isinstance(value, (bytes, bytearray)):
                data, path = value, None
            else:
                data, path = None, value
            with _pillow_allows(max_pixels):
                image = Image.open(io.BytesIO(data)) if data else Image.open(path)  # reads the header only
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            return None, f"{width}x{height} pixels, above max_image_pixels={max_pixels}"
        image.load()
        return np.asarray(_to_rgb(image), dtype=np.uint8), None
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        logger.debug("undecodable image: %s", error)
        return None, f"undecodable ({str(error).splitlines()[0] if str(error) else type(error).__name__})"


@contextlib.contextmanager
def _pillow_allows(max_pixels: int | None):
    """Pillow refuses to open images above 2 x `PIL.Image.MAX_IMAGE_PIXELS` (179 MP by default). A
    larger `max_pixels` budget, asked for explicitly, lifts that guard while one image is opened;
    the budget itself is then checked from the header."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is None or pillow_limit is None or max_pixels <= 2 * pillow_limit:
        yield
        return
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = np.nanmin(array), np.nanmax(array)
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def sample_seed(seed: int, epoch: int, *position: int) -> int:
    """A per-sample augmentation seed that depends only on (run seed, epoch, sample position),
    the position being the dataset index, or (rank, worker, index in the stream) when streaming."""
    return int(np.random.SeedSequence([seed, epoch, *position]).generate_state(1)[0])


def multicrop_sample(image_cell: Any, augmentation: Callable, seed: int, index: int,
                     max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """Decode one image cell and crop it: {"crops": list of V tensors, or None if skipped, "index"};
    the index of a skipped image also names its file (when the cell holds a path) and the reason."""
    image, reason = read_image(image_cell, max_pixels)
    if image is None:
        path = image_cell.get("path") if isinstance(image_cell, dict) else None
        return {"crops": None, "index": f"{index} ({path + ': ' if path else ''}{reason})"}
    return {"crops": augmentation(image, seed=seed), "index": index}


class SharedEpoch:
    """Base of the training datasets: the current epoch, held in shared memory so that persistent
    DataLoader workers (created once, each with its own copy of the dataset) read the value the
    main process sets before each epoch's iterator starts. 🤗 datasets' IterableDataset shares
    its epoch the same way."""

    def __init__(self):
        self._epoch = torch.tensor(0, dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)


class MultiCropDataset(SharedEpoch, torch.utils.data.Dataset):
    """Map-style dataset: item i -> {"crops": list of V tensors (3, S, S)} or None if undecodable.

    The crops depend on (seed, epoch, i) only; call `set_epoch` before each epoch (before
    iterating the DataLoader: persistent workers see it through shared memory).
    """

    def __init__(self, dataset: datasets.Dataset, augmentation: Callable, image_column: str = "image",
                 seed: int = 0, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.dataset = prepare_image_column(dataset, image_column)
        self.augmentation = augmentation
        self.image_column = image_column
        self.seed = seed
        self.max_pixels = max_pixels
        SharedEpoch.__init__(self)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return multicrop_sample(self.dataset[index][self.image_column], self.augmentation,
                                sample_seed(self.seed, self.epoch, index), index, self.max_pixels)


def collate_multicrop(samples: list[dict]) -> dict:
    """Stack each view over the batch: {"crops": V tensors (B, 3, S_v, S_v), "num_skipped",
    "skipped_indices"}; undecodable samples are dropped and counted."""
    kept = [sample for sample in samples if sample["crops"] is not None]
    skipped = [sample["index"] for sample in samples if sample["crops"] is None]
    crops = [torch.stack(view) for view in zip(*(sample["crops"] for sample in kept))] if kept else []
    return {"crops": crops, "num_skipped": len(skipped), "skipped_indices": skipped}


class LabelledImageDataset(torch.utils.data.Dataset):
    """Evaluation dataset: item i -> {"pixel_values": (3, S, S), "label": int} or None."""

    def __init__(self, dataset: datasets.Dataset, transform: Callable, image_column: str = "image",
                 label_column: str = "label"):
        self.dataset = prepare_labelled_columns(dataset, image_column, label_column)
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        return labelled_sample(self.dataset[index], self.transform, self.image_column, self.label_column)


def prepare_labelled_columns(dataset, image_column: str, label_column: str):
    """`prepare_image_column`, after checking that `label_column` exists (a one-line KeyError if not)."""
    if dataset.features is not None and label_column not in dataset.features:
        raise KeyError(f"--label_column {label_column!r} not in the dataset's columns "
                       f"({', '.join(dataset.features)}); pass the right --label_column.")
    return prepare_image_column(dataset, image_column)


def labelled_sample(row: dict, transform: Callable, image_column: str, label_column: str) -> dict | None:
    """A dataset row -> {"pixel_values": (3, S, S), "label": int}, or None when its image is undecodable."""
    image = decode_image(row[image_column])
    if image is None:
        return None
    return {"pixel_values": transform(image=image)["image"], "label": int(row[label_column])}


def collate_labelled(samples: list[dict | None]) -> dict:
    """{"pixel_values": (B, 3, S, S), "labels": (B,), "num_skipped": int}."""
    kept = [sample for sample in samples if sample is not None]
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in kept]) if kept else torch.empty(0),
        "labels": torch.tensor([sample["label"] for sample in kept], dtype=torch.long),
        "num_skipped": len(samples) - len(kept),
    }


class StreamingMultiCropDataset(SharedEpoch, torch.utils.data.IterableDataset):
    """Iterable counterpart of `MultiCropDataset` over a streamed 🤗 `IterableDataset`, resumable
    exactly and cheaply.

    Each process reads its part of the stream (`split_dataset_by_node`: its own shards, or every
    world_size-th example); DataLoader workers split it further (🤗 datasets does this itself).
    🤗 datasets shuffles the shard order per epoch (`set_epoch`); the examples are shuffled in
    blocks of `shuffle_buffer_size`, each by a permutation drawn from (seed, epoch, rank, worker,
    block). Crops depend on (seed, epoch, rank, worker, position in the worker's stream).

    `state_dict()` is the position of the worker it is called in: the stream's state where its
    current block began (🤗 datasets' `state_dict`, at most `shuffle_buffer_size` rows back), the
    block's number and how many of its examples were yielded. torchdata's `StatefulDataLoader`
    collects it from every worker with each batch; after `load_state_dict` a worker re-reads the
    raw rows of one block (no image is decoded), draws the same permutation and continues with the
    next example. A buffer shuffle could not resume exactly without saving its buffer, the
    images themselves.
    """

    def __init__(self, dataset: datasets.IterableDataset, augmentation: Callable, image_column: str = "image",
                 seed: int = 0, shuffle_buffer_size: int = 10_000, rank: int = 0, world_size: int = 1,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        from datasets.distributed import split_dataset_by_node

        dataset = prepare_image_column(dataset, image_column)
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        # the shard order is shuffled per epoch; a buffer of 1 holds nothing between examples, so the
        # stream's state_dict is exact (the blocks below shuffle the examples). One shard at a time:
        # 🤗 datasets cannot restore the state of its shard interleaving inside a DataLoader worker that
        # reads several shards (IndexError in `load_state_dict`, docs/SCALING.md)
        self.dataset = dataset.shuffle(seed=seed, buffer_size=1, max_buffer_input_shards=1)
        self.augmentation = augmentation
        self.image_column = image_column
        self.seed = seed
        self.block_size = shuffle_buffer_size
        self.rank = rank
        self.max_pixels = max_pixels
        self._position: dict | None = None  # of the iteration running in this process (worker)
        self._resume_from: dict | None = None
        SharedEpoch.__init__(self)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)  # 🤗 datasets shares its own epoch with persistent workers

    def state_dict(self) -> dict:
        """{"epoch", "stream" (the state where the current block began; None: the epoch's start),
        "block", "offset" (examples of the block already yielded)} of this worker's iteration."""
        return self._position or {"epoch": self.epoch, "stream": None, "block": 0, "offset": 0}

    def load_state_dict(self, state: dict) -> None:
        """Continue the next iteration of `state["epoch"]` from `state` (another epoch starts afresh)."""
        self._resume_from = state

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        epoch = self.epoch
        resume, self._resume_from = self._resume_from, None
        if resume is None or resume["epoch"] != epoch:
            resume = {"epoch": epoch, "stream": None, "block": 0, "offset": 0}
        if resume["stream"] is not None:
            self.dataset.load_state_dict(resume["stream"])
        block, skip, block_start = resume["block"], resume["offset"], resume["stream"]
        rows = iter(self.dataset)
        while True:
            examples = list(itertools.islice(rows, self.block_size))  # raw rows: nothing decoded yet
            if not examples:
                return
            order = np.random.default_rng([self.seed, epoch, self.rank, worker_id, block]).permutation(len(examples))
            for offset in range(skip, len(examples)):
                self._position = {"epoch": epoch, "stream": block_start, "block": block, "offset": offset + 1}
                position = block * self.block_size + offset
                seed = sample_seed(self.seed, epoch, self.rank, worker_id, position)
                yield multicrop_sample(examples[order[offset]][self.image_column], self.augmentation, seed, position,
                                       self.max_pixels)
            block, skip, block_start = block + 1, 0, self.dataset.state_dict()


class StreamingLabelledImageDataset(torch.utils.data.IterableDataset):
    """Iterable counterpart of `LabelledImageDataset` over a streamed split, split across processes
    (`split_dataset_by_node`): example -> {"pixel_values": (3, S, S), "label": int} or None."""

    def __init__(self, dataset: datasets.IterableDataset, transform: Callable, image_column: str = "image",
                 label_column: str = "label", rank: int = 0, world_size: int = 1):
        from datasets.distributed import split_dataset_by_node

        dataset = prepare_labelled_columns(dataset, image_column, label_column)
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size) if world_size > 1 else dataset
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __iter__(self):
        for row in self.dataset:
            yield labelled_sample(row, self.transform, self.image_column, self.label_column)


def streamed_split_length(dataset) -> int | None:
    """Number of examples of a streamed split when its metadata knows it, else None."""
    info = getattr(dataset, "info", None)
    splits = getattr(info, "splits", None) or {}
    split = getattr(dataset, "split", None)
    if split is not None and str(split) in splits:
        return splits[str(split)].num_examples
    return None
