"""Semi-supervised video object segmentation on DAVIS by label propagation (DINO section 4.2).

The protocol of the reference's `eval_video_segmentation.py`:

- every frame is resized so its short side is 480 px and its long side is floored to a multiple
  of 64 (854 x 480 -> 832 x 480), bilinearly, and normalised with the ImageNet mean and std;
- a frame's feature is the last layer's patch tokens after the final layer norm, L2-normalised:
  (N, D) with N = (H / p) * (W / p) for patch size p; each frame is encoded once, in batches;
- the first frame's annotation, nearest-resized to the patch grid and one-hot encoded, is the
  first context; each later frame takes its labels from the first frame and the
  `n_last_frames` previous predictions (soft labels, kept as they are);
- for every patch of the target frame: cosine similarity to every patch of every context frame
  within a (2s + 1)^2 spatial window (s = `size_mask_neighborhood`; 0 = no window), the `topk`
  most similar over all context frames jointly, weights softmax(similarity / temperature) over
  them, and the label = the weighted mean of their labels;
- labels are upsampled bilinearly by p, each channel min-max normalised, the argmax taken and
  nearest-resized to the original frame size; written as palette PNGs with the first
  annotation's palette.

The affinity is computed in bands of target rows, each against the key rows its window can
reach, so that no (context x N x N) matrix is built when it would not fit `affinity_memory_mb`.

Two numerical quirks of the reference are available as options (both off by default, see
docs/EVALUATION.md): its red-channel std 0.228 instead of 0.229 (`reference_normalization`)
and its `+0.1` in the position-embedding interpolation (`reference_pos_interpolation`).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .davis_metrics import score_sequence, summarize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_STD = (0.228, 0.224, 0.225)  # the reference script's (typo'd) red std
SHORT_SIDE = 480
LONG_SIDE_MULTIPLE = 64
FRAME_SUFFIXES = (".jpg", ".jpeg")


class DavisInputError(ValueError):
    """Bad DAVIS input (missing, unreadable or inconsistent file); the message names the file."""


@dataclass
class PropagationSettings:
    """Label propagation hyper-parameters (the reference's defaults)."""

    n_last_frames: int = 7
    size_mask_neighborhood: int = 12
    topk: int = 5
    temperature: float = 0.1
    affinity_memory_mb: float = 512.0  # largest affinity block (context x queries x keys) computed at once
    batch_size: int = 8  # frames encoded per forward pass
    reference_normalization: bool = False
    reference_pos_interpolation: bool = False


@dataclass
class DavisSequence:
    """One sequence: its frames in order and the annotation file of each annotated frame."""

    name: str
    frames: list[Path]
    annotations: dict[str, Path]  # frame stem -> annotation PNG
    size: tuple[int, int]  # (height, width) of every frame

    @property
    def first_annotation(self) -> Path:
        return self.annotations[self.frames[0].stem]

    @property
    def fully_annotated(self) -> bool:
        return all(frame.stem in self.annotations for frame in self.frames)


# ----------------------------------------------------------------------------------------------
# Reading DAVIS
# ----------------------------------------------------------------------------------------------

def image_set_names(davis_root: str | Path, resolution: str = "480p") -> list[str]:
    """Sequence names of the validation list: DAVIS-2017 `ImageSets/2017/val.txt` (one name a
    line) or DAVIS-2016 `ImageSets/480p/val.txt` (`/JPEGImages/480p/SEQ/NNNNN.jpg /Annotations/...`
    pairs; `1080p/` for Full-Resolution), names in their first-appearance order."""
    root = Path(davis_root)
    davis2017 = root / "ImageSets" / "2017" / "val.txt"
    davis2016 = root / "ImageSets" / ("1080p" if resolution == "Full-Resolution" else "480p") / "val.txt"
    if davis2017.is_file():
        return [line.strip() for line in davis2017.read_text().splitlines() if line.strip()]
    if davis2016.is_file():
        names: dict[str, None] = {}
        for line in davis2016.read_text().splitlines():
            if line.strip():
                names[Path(line.split()[0]).parent.name] = None
        return list(names)
    raise DavisInputError(f"{root}: no image-set list ({davis2017} or {davis2016}); give --sequences "
                          "or the DAVIS root holding ImageSets/")


def load_sequence(davis_root: str | Path, name: str, resolution: str = "480p") -> DavisSequence:
    """Find a sequence's frames and annotations and check them (before anything is written):
    at least one frame, the first frame annotated, every frame and the first annotation the same size."""
    root = Path(davis_root)
    frame_dir = root / "JPEGImages" / resolution / name
    annotation_dir = root / "Annotations" / resolution / name
    if not frame_dir.is_dir():
        raise DavisInputError(f"{frame_dir}: no such frame folder (sequence {name!r})")
    frames = sorted(p for p in frame_dir.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise DavisInputError(f"{frame_dir}: empty sequence, no .jpg frame")
    annotations = {p.stem: p for p in sorted(annotation_dir.glob("*.png"))} if annotation_dir.is_dir() else {}
    first = annotations.get(frames[0].stem)
    if first is None:
        raise DavisInputError(f"{annotation_dir / (frames[0].stem + '.png')}: missing first-frame annotation "
                              f"of sequence {name!r}")
    size = image_size(frames[0])
    annotation_size = image_size(first)
    if annotation_size != size:
        raise DavisInputError(f"{first}: annotation is {annotation_size[1]}x{annotation_size[0]} but frame "
                              f"{frames[0]} is {size[1]}x{size[0]}")
    for frame in frames[1:]:
        if image_size(frame) != size:
            other = image_size(frame)
            raise DavisInputError(f"{frame}: frame is {other[1]}x{other[0]}, the sequence's first frame "
                                  f"{size[1]}x{size[0]}")
    return DavisSequence(name=name, frames=frames, annotations=annotations, size=size)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from an image's header; a clear error naming an unreadable file."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError) as error:
        raise DavisInputError(f"{path}: unreadable image ({error})") from error
    return height, width


def davis_palette() -> np.ndarray:
    """(256, 3) uint8: the DAVIS / PASCAL VOC colour map (id 1 dark red, 2 green, ...)."""
    ids = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return palette


def read_annotation(path: Path, binary_mask: bool | None = None) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """An annotation PNG -> (object ids (H, W) uint8, palette (256, 3) or None, binary_mask).

    DAVIS-2017 palette PNGs hold object ids (255 = void, read as background as the toolkit
    does); DAVIS-2016 masks are 0/255 greyscale (255 = object 1). `binary_mask=None` decides
    from this file (not a palette image and only 0/255 values); pass the first frame's decision
    for the others of a sequence.
    """
    try:
        with Image.open(path) as image:
            palette = None
            if image.mode == "P":
                raw = image.getpalette() or []
                palette = np.zeros((256, 3), dtype=np.uint8)
                colours = np.asarray(raw, dtype=np.uint8).reshape(-1, 3)[:256]
                palette[:len(colours)] = colours
                ids = np.array(image)
            else:
                ids = np.array(image.convert("L"))
    except (OSError, SyntaxError) as error:
        raise DavisInputError(f"{path}: unreadable annotation ({error})") from error
    if binary_mask is None:
        binary_mask = palette is None and bool(np.isin(ids, (0, 255)).all())
    ids = (ids == 255).astype(np.uint8) if binary_mask else np.where(ids == 255, 0, ids).astype(np.uint8)
    return ids, palette, binary_mask


def resized_shape(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The reference's network input size: short side 480, long side scaled and floored to a
    multiple of 64 (480 x 854 -> 480 x 832). For a patch size that does not divide 480 or 64
    both sides are then floored to a multiple of it."""
    if height > width:
        new_width, new_height = SHORT_SIDE, int((SHORT_SIDE * height / width) // LONG_SIDE_MULTIPLE * LONG_SIDE_MULTIPLE)
    else:
        new_height, new_width = SHORT_SIDE, int((SHORT_SIDE * width / height) // LONG_SIDE_MULTIPLE * LONG_SIDE_MULTIPLE)
    new_height, new_width = new_height // patch_size * patch_size, new_width // patch_size * patch_size
    if new_height < patch_size or new_width < patch_size:
        raise DavisInputError(f"{width}x{height} frames are too narrow for patch size {patch_size}")
    return new_height, new_width


def read_frame(path: Path, shape: tuple[int, int], mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> tuple[torch.Tensor, tuple[int, int]]:
    """A frame file -> (normalised RGB (3, H', W') float32 at `shape`, original (height, width)).

    Decoded and resized (bilinear, on uint8) with OpenCV as the reference does."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DavisInputError(f"{path}: unreadable frame")
    original = image.shape[:2]
    image = cv2.resize(image, (shape[1], shape[0]))
    pixels = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).permute(2, 0, 1).float() / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_t) / std_t, original


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------

def video_backbone(model: nn.Module) -> nn.Module:
    """The `ViTModel` of a `DinoModel` or a ViT itself; a clear error for other backbones
    (label propagation needs patch tokens)."""
    backbone = getattr(model, "backbone", model)
    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    if model_type != "vit":
        raise ValueError(f"DAVIS label propagation needs a ViT backbone (patch tokens); got {model_type!r}")
    return backbone


def reference_interpolation(position_embeddings: torch.Tensor, height: int, width: int,
                            patch_size: int) -> torch.Tensor:
    """The reference's position-embedding interpolation: bicubic with scale factors
    ((H / p + 0.1) / g, (W / p + 0.1) / g) for a g x g grid. (1, 1 + g^2, D) -> (1, 1 + hw, D)."""
    class_embedding, patch_embedding = position_embeddings[:, :1], position_embeddings[:, 1:]
    grid = math.isqrt(patch_embedding.shape[1])
    rows, columns = height // patch_size, width // patch_size
    if rows * columns == grid * grid and height == width:
        return position_embeddings
    dim = patch_embedding.shape[-1]
    patch_embedding = F.interpolate(
        patch_embedding.reshape(1, grid, grid, dim).permute(0, 3, 1, 2),
        scale_factor=((rows + 0.1) / grid, (columns + 0.1) / grid), mode="bicubic")
    patch_embedding = patch_embedding.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_embedding, patch_embedding), dim=1)


@contextlib.contextmanager
def reference_pos_interpolation(vit: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, `vit` interpolates its position embeddings as the reference does."""
    if not enabled:
        yield
        return
    embeddings = vit.embeddings

    def interpolate(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return reference_interpolation(embeddings.position_embeddings, height, width, embeddings.patch_size)

    embeddings.interpolate_pos_encoding = interpolate
    try:
        yield
    finally:
        del embeddings.interpolate_pos_encoding


@torch.no_grad()
def patch_features(vit: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H/p * W/p, D) last-layer patch tokens after the final norm, L2-normalised."""
    tokens = vit(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
    return F.normalize(tokens.float(), dim=-1)


def frame_feature_stream(vit: nn.Module, frames: Sequence[Path], shape: tuple[int, int], batch_size: int,
                         device: torch.device | str, mean: Sequence[float], std: Sequence[float],
                         pos_interpolation: bool = False) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
    """Yield (features (N, D) on `device`, original (height, width)) for every frame in order,
    encoding `batch_size` frames per forward pass while the next batch is decoded."""
    batches = [frames[i:i + batch_size] for i in range(0, len(frames), batch_size)]

    def read_batch(paths):
        return [read_frame(path, shape, mean, std) for path in paths]

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read_batch, batches[0]) if batches else None
        for index in range(len(batches)):
            decoded = pending.result()
            pending = reader.submit(read_batch, batches[index + 1]) if index + 1 < len(batches) else None
            pixels = torch.stack([pixels for pixels, _ in decoded]).to(device)
            with reference_pos_interpolation(vit, pos_interpolation):
                features = patch_features(vit, pixels)
            for feature, (_, original) in zip(features, decoded):
                yield feature, original


# ----------------------------------------------------------------------------------------------
# Propagation
# ----------------------------------------------------------------------------------------------

def rows_per_chunk(grid: tuple[int, int], num_context: int, neighborhood: int, memory_mb: float) -> int:
    """Most target rows whose affinity block (context x rows*w x reachable rows*w, float32, and
    one copy) fits in `memory_mb`; at least 1."""
    height, width = grid
    budget = memory_mb * 2 ** 20
    for rows in range(height, 0, -1):
        key_rows = height if neighborhood <= 0 else min(height, rows + 2 * neighborhood)
        if 2 * 4 * num_context * rows * width * key_rows * width <= budget:
            return rows
    return 1


def propagate_labels(target: torch.Tensor, context_features: torch.Tensor, context_labels: torch.Tensor,
                     grid: tuple[int, int], topk: int = 5, temperature: float = 0.1, neighborhood: int = 12,
                     chunk_rows: int | None = None, memory_mb: float = 512.0) -> torch.Tensor:
    """Labels of a target frame from its context frames.

    target (N, D) and context_features (C, N, D): L2-normalised patch features on an (h, w) grid,
    N = h * w; context_labels (C, L, N) soft labels. Each target patch takes the softmax(sim / T)
    weighted mean of the labels of its `topk` most similar context patches (over all C frames
    jointly) within `neighborhood` rows and columns of it (0: anywhere). Computed for
    `chunk_rows` target rows at a time (default: as many as fit `memory_mb`). Returns (L, N).
    """
    height, width = grid
    num_context, num_patches, _ = context_features.shape
    if num_patches != height * width or target.shape[0] != num_patches:
        raise ValueError(f"features of {num_patches} / {target.shape[0]} patches for a {height}x{width} grid")
    chunk_rows = chunk_rows or rows_per_chunk(grid, num_context, neighborhood, memory_mb)
    labels_by_patch = context_labels.permute(1, 0, 2)  # (L, C, N)
    output = target.new_empty(context_labels.shape[1], num_patches)
    rows = torch.arange(height, device=target.device)
    columns = torch.arange(width, device=target.device)
    for first_row in range(0, height, chunk_rows):
        last_row = min(height, first_row + chunk_rows)
        if neighborhood > 0:
            first_key, last_key = max(0, first_row - neighborhood), min(height, last_row + neighborhood)
        else:
            first_key, last_key = 0, height
        queries = target[first_row * width:last_row * width]  # (Q, D)
        num_keys = (last_key - first_key) * width
        keys = context_features[:, first_key * width:last_key * width].reshape(num_context * num_keys, -1)
        similarity = queries @ keys.T  # (Q, C * K), context-major
        if neighborhood > 0:
            row_near = (rows[first_row:last_row, None] - rows[None, first_key:last_key]).abs() <= neighborhood
            column_near = (columns[:, None] - columns[None, :]).abs() <= neighborhood
            near = (row_near[:, None, :, None] & column_near[None, :, None, :]).reshape(queries.shape[0], num_keys)
            similarity.view(queries.shape[0], num_context, num_keys).masked_fill_(~near[:, None, :], float("-inf"))
        top_similarity, top_index = similarity.topk(min(topk, similarity.shape[1]), dim=1)  # (Q, k)
        weights = torch.softmax(top_similarity / temperature, dim=1)
        context_index = top_index // num_keys
        key_index = top_index % num_keys + first_key * width
        neighbour_labels = labels_by_patch[:, context_index, key_index]  # (L, Q, k)
        output[:, first_row * width:last_row * width] = (neighbour_labels * weights).sum(-1)
    return output


def one_hot_labels(ids: np.ndarray, num_labels: int) -> torch.Tensor:
    """(h, w) integer ids -> (num_labels, h * w) float one-hot."""
    flat = torch.from_numpy(ids.astype(np.int64)).flatten()
    return F.one_hot(flat, num_labels).T.float()


def grid_labels(first_ids: np.ndarray, grid: tuple[int, int], num_labels: int) -> torch.Tensor:
    """The first annotation nearest-resized (PIL) to the (h, w) patch grid -> (num_labels, h * w)."""
    small = np.array(Image.fromarray(first_ids).resize((grid[1], grid[0]), Image.NEAREST))
    return one_hot_labels(small, num_labels)


def labels_to_ids(soft_labels: torch.Tensor, patch_size: int, original: tuple[int, int]) -> np.ndarray:
    """(L, h, w) soft labels -> (height, width) uint8 ids: bilinear upsampling by the patch size,
    each channel whose maximum is > 0 min-max normalised to [0, 1], argmax, nearest resize to
    the original frame size."""
    upsampled = F.interpolate(soft_labels[None].float(), scale_factor=patch_size, mode="bilinear",
                              align_corners=False)[0]
    low = upsampled.amin(dim=(1, 2), keepdim=True)
    high = upsampled.amax(dim=(1, 2), keepdim=True)
    span = high - low
    normalised = torch.where(span > 0, (upsampled - low) / span.clamp_min(1e-12), torch.zeros_like(upsampled))
    normalised = torch.where(high > 0, normalised, upsampled)
    if normalised.device.type == "cpu":  # numpy's argmax over channels is ~50x faster than torch's on CPU
        ids = normalised.numpy().argmax(axis=0).astype(np.uint8)
    else:
        ids = normalised.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.array(Image.fromarray(ids).resize((original[1], original[0]), Image.NEAREST))


def write_indexed_png(path: Path, ids: np.ndarray, palette: np.ndarray) -> None:
    """(H, W) uint8 ids -> palette PNG."""
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(palette.astype(np.uint8).ravel().tolist())
    image.save(path, format="PNG")


@dataclass
class SequenceResult:
    name: str
    predictions: np.ndarray  # (T, H, W) uint8 ids, frame 0 the given annotation
    frame_stems: list[str]
    binary_mask: bool
    seconds: float


def segment_sequence(model: nn.Module, sequence: DavisSequence, output_dir: str | Path,
                     settings: PropagationSettings = PropagationSettings(), device: torch.device | str = "cpu",
                     progress: bool = True) -> SequenceResult:
    """Propagate the first annotation through `sequence`; write `output_dir/SEQ/NNNNN.png`.

    The PNGs are written to `output_dir/.SEQ.partial` and moved into place once the whole
    sequence succeeded (a failure leaves no partial `output_dir/SEQ`)."""
    vit = video_backbone(model)
    patch_size = vit.config.patch_size
    shape = resized_shape(*sequence.size, patch_size)
    grid = (shape[0] // patch_size, shape[1] // patch_size)
    first_ids, palette, binary_mask = read_annotation(sequence.first_annotation)
    palette = davis_palette() if palette is None else palette
    num_labels = int(first_ids.max()) + 1
    first_labels = grid_labels(first_ids, grid, num_labels).to(device)
    std = REFERENCE_STD if settings.reference_normalization else IMAGENET_STD

    output_dir = Path(output_dir)
    final_dir = output_dir / sequence.name
    partial_dir = output_dir / f".{sequence.name}.partial"
    shutil.rmtree(partial_dir, ignore_errors=True)
    partial_dir.mkdir(parents=True)
    start = time.perf_counter()
    try:
        stream = frame_feature_stream(vit, sequence.frames, shape, settings.batch_size, device, IMAGENET_MEAN, std,
                                      settings.reference_pos_interpolation)
        first_features, _ = next(stream)
        write_indexed_png(partial_dir / f"{sequence.frames[0].stem}.png", first_ids, palette)
        predictions = [first_ids]
        recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=settings.n_last_frames or None)
        frames = tqdm(zip(sequence.frames[1:], stream), total=len(sequence.frames) - 1, desc=sequence.name,
                      disable=not progress, leave=False)
        for frame, (features, original) in frames:
            if original != sequence.size:
                raise DavisInputError(f"{frame}: decoded as {original[1]}x{original[0]}, expected "
                                      f"{sequence.size[1]}x{sequence.size[0]}")
            context = [(first_features, first_labels)] + (list(recent) if settings.n_last_frames else [])
            soft = propagate_labels(features, torch.stack([f for f, _ in context]),
                                    torch.stack([label for _, label in context]), grid, settings.topk,
                                    settings.temperature, settings.size_mask_neighborhood,
                                    memory_mb=settings.affinity_memory_mb)
            if settings.n_last_frames:
                recent.append((features, soft))
            ids = labels_to_ids(soft.reshape(-1, *grid), patch_size, original)
            write_indexed_png(partial_dir / f"{frame.stem}.png", ids, palette)
            predictions.append(ids)
        seconds = time.perf_counter() - start
    except BaseException:
        shutil.rmtree(partial_dir, ignore_errors=True)
        raise
    shutil.rmtree(final_dir, ignore_errors=True)
    partial_dir.rename(final_dir)
    return SequenceResult(sequence.name, np.stack(predictions), [f.stem for f in sequence.frames], binary_mask, seconds)


def read_ground_truth(sequence: DavisSequence, binary_mask: bool) -> np.ndarray:
    """(T, H, W) uint8 ids of every frame's annotation (the sequence must be fully annotated)."""
    masks = []
    for frame in sequence.frames:
        path = sequence.annotations[frame.stem]
        ids, _, _ = read_annotation(path, binary_mask)
        if ids.shape != sequence.size:
            raise DavisInputError(f"{path}: annotation is {ids.shape[1]}x{ids.shape[0]}, frames are "
                                  f"{sequence.size[1]}x{sequence.size[0]}")
        masks.append(ids)
    return np.stack(masks)


def first_mask_baseline(ground_truth: np.ndarray) -> np.ndarray:
    """The propagate-nothing prediction: the first annotation copied to every frame."""
    return np.repeat(ground_truth[:1], len(ground_truth), axis=0)


def evaluate_davis(model: nn.Module, davis_root: str | Path, output_dir: str | Path,
                   sequences: Sequence[str] | None = None, resolution: str = "480p",
                   settings: PropagationSettings = PropagationSettings(), device: torch.device | str = "cpu",
                   progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Segment every sequence (default: the image-set list's) and score the fully annotated ones.

    Returns the toolkit's summary in percent (`J&F-Mean`, `J-Mean`, ... `per_sequence`,
    `per_object`), the propagate-nothing baseline's `J&F-Mean`/`J-Mean`/`F-Mean` under
    `first_mask_baseline`, `frames`, `seconds_per_frame` and `unscored_sequences`.
    All sequences are checked before anything is written."""
    names = list(sequences) if sequences else image_set_names(davis_root, resolution)
    loaded = [load_sequence(davis_root, name, resolution) for name in names]
    scored, baseline, unscored = {}, {}, []
    frames, seconds = 0, 0.0
    for sequence in loaded:
        result = segment_sequence(model, sequence, output_dir, settings, device, progress)
        frames += len(sequence.frames) - 1
        seconds += result.seconds
        if log:
            log(f"{sequence.name}: {len(sequence.frames)} frames, {result.seconds / max(1, len(sequence.frames) - 1):.3f} s/frame")
        if not sequence.fully_annotated or len(sequence.frames) < 3:
            unscored.append(sequence.name)
            continue
        truth = read_ground_truth(sequence, result.binary_mask)
        scored[sequence.name] = score_sequence(truth, result.predictions)
        baseline[sequence.name] = score_sequence(truth, first_mask_baseline(truth))
    summary = summarize(scored) if scored else {key: None for key in (
        "J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay", "per_sequence", "per_object")}
    if baseline:
        baseline_summary = summarize(baseline)
        summary["first_mask_baseline"] = {key: baseline_summary[key] for key in ("J&F-Mean", "J-Mean", "F-Mean")}
    summary["unscored_sequences"] = unscored
    summary["frames"] = frames
    summary["seconds_per_frame"] = seconds / frames if frames else None
    return summary
