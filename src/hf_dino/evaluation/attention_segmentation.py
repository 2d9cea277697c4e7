"""Probing the self-attention map (DINO section 4.3, Table 7): Jaccard of thresholded last-block
[CLS] attention against ground-truth object masks.

For every image:

- the image is resized to an `image_size` square (bilinear, PIL, as the reference's
  `visualize_attention.py` does with `Resize((480, 480))`), normalised with the ImageNet mean
  and std, and cropped (top-left) to a multiple of the patch size p; the ground truth is
  resized to the same square (nearest) and cropped with it;
- the ViT's last-block attention of the [CLS] token to the (S/p)^2 patches gives one map per
  head (`hf_dino.visualization.attention.cls_attention_and_feature`: one forward per batch, SDPA up to the
  last block, only the CLS row of the last block);
- each head's mask keeps the fewest most-attended patches holding `threshold` of its attention
  mass (`attention_mass_masks`, the reference's rule), upsampled to pixels by nearest; the
  mask of the head-averaged attention likewise;
- Jaccard = |mask AND truth| / |mask OR truth| over the valid pixels (VOC's 255 border
  counts as neither foreground nor background); both empty counts as 1.

Scores are in percent, means over images: `per_head` (heads,), `mean_head` (their mean),
`best_head` (the head with the best mean over the whole set) and `best_head_index`,
`averaged_attention`, and the `centre_prior` baseline: a centred square with the mean area of
the averaged-attention masks, scored the same way.

Layouts: DAVIS (`JPEGImages/480p/SEQ/*.jpg`, `Annotations/480p/SEQ/*.png`, foreground =
annotation > 0) and PASCAL VOC (`JPEGImages/ID.jpg`, `SegmentationObject/ID.png` or
`SegmentationClass/ID.png`, `ImageSets/Segmentation/val.txt`; foreground = any object, 255 ignored).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..visualization.attention import attention_mass_masks, cls_attention_and_feature, upsample_to_image, vit_backbone
from .video_segmentation import (IMAGENET_MEAN, IMAGENET_STD, DavisInputError, image_set_names, load_sequence,
                                 reference_pos_interpolation)

LAYOUTS = ("davis", "voc")
DAVIS_RESOLUTION = "480p"
VOC_IGNORE = 255
VOC_MASK_FOLDERS = ("SegmentationObject", "SegmentationClass")


class SegmentationInputError(ValueError):
    """Missing, unreadable or inconsistent input; the message names the file or folder."""


@dataclass(frozen=True)
class Sample:
    """One image and its ground truth. `group` is the DAVIS sequence (None for VOC)."""

    name: str  # "SEQ/NNNNN" (DAVIS) or the VOC image id
    image: Path
    annotation: Path
    group: str | None = None


# ----------------------------------------------------------------------------------------------
# Reading the data
# ----------------------------------------------------------------------------------------------

def detect_layout(root: str | Path) -> str:
    """"davis" when ROOT has JPEGImages/480p and Annotations/480p, "voc" when it has
    JPEGImages and ImageSets/Segmentation; SegmentationInputError otherwise."""
    root = Path(root)
    if (root / "JPEGImages" / DAVIS_RESOLUTION).is_dir() and (root / "Annotations" / DAVIS_RESOLUTION).is_dir():
        return "davis"
    if (root / "JPEGImages").is_dir() and (root / "ImageSets" / "Segmentation").is_dir():
        return "voc"
    raise SegmentationInputError(
        f"{root}: neither a DAVIS root (JPEGImages/480p/, Annotations/480p/) nor a VOC root (JPEGImages/, "
        "SegmentationObject/ or SegmentationClass/, ImageSets/Segmentation/)")


def davis_samples(root: str | Path, sequences: Sequence[str] | None = None,
                  max_frames: int | None = None) -> list[Sample]:
    """The annotated 480p frames of each sequence, in order (the first `max_frames` of each).
    Sequences: `sequences`, else the image-set list's, else every folder of JPEGImages/480p."""
    root = Path(root)
    frames_root = root / "JPEGImages" / DAVIS_RESOLUTION
    if not frames_root.is_dir():
        raise SegmentationInputError(f"{frames_root}: no such folder (not a DAVIS root)")
    if not sequences:
        try:
            sequences = image_set_names(root, DAVIS_RESOLUTION)
        except DavisInputError:
            sequences = sorted(p.name for p in frames_root.iterdir() if p.is_dir())
    if not sequences:
        raise SegmentationInputError(f"{frames_root}: no sequence folder")
    samples = []
    for name in sequences:
        try:
            sequence = load_sequence(root, name, DAVIS_RESOLUTION)
        except DavisInputError as error:
            raise SegmentationInputError(str(error)) from error
        frames = [frame for frame in sequence.frames if frame.stem in sequence.annotations][:max_frames]
        samples += [Sample(f"{name}/{frame.stem}", frame, sequence.annotations[frame.stem], name) for frame in frames]
    return samples


def voc_samples(root: str | Path, image_set: str = "val", max_images: int | None = None) -> list[Sample]:
    """The images listed in ImageSets/Segmentation/IMAGE_SET.txt with their SegmentationObject
    (else SegmentationClass) PNGs; every listed file must exist."""
    root = Path(root)
    listing = root / "ImageSets" / "Segmentation" / f"{image_set}.txt"
    if not listing.is_file():
        raise SegmentationInputError(f"{listing}: no such image list")
    folder = next((root / name for name in VOC_MASK_FOLDERS if (root / name).is_dir()), None)
    if folder is None:
        raise SegmentationInputError(f"{root}: no SegmentationObject/ or SegmentationClass/ folder")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()][:max_images]
    if not ids:
        raise SegmentationInputError(f"{listing}: lists no image")
    samples = []
    for image_id in ids:
        image, annotation = root / "JPEGImages" / f"{image_id}.jpg", folder / f"{image_id}.png"
        for path in (image, annotation):
            if not path.is_file():
                raise SegmentationInputError(f"{path}: missing (listed in {listing})")
        samples.append(Sample(image_id, image, annotation))
    return samples


def read_image(path: Path, size: int, patch_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """An image file -> (the pixels the model sees (S', S', 3) uint8, normalised (3, S', S') float32):
    RGB, resized to `size` x `size` (PIL bilinear), cropped top-left to S' = size floored to a
    multiple of `patch_size`."""
    try:
        with Image.open(path) as image:
            resized = np.array(image.convert("RGB").resize((size, size), Image.BILINEAR))
    except (OSError, SyntaxError) as error:
        raise SegmentationInputError(f"{path}: unreadable image ({error})") from error
    side = size // patch_size * patch_size
    resized = np.ascontiguousarray(resized[:side, :side])
    pixels = torch.from_numpy(resized).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return resized, (pixels - mean) / std


def read_truth(path: Path, layout: str, size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """An annotation PNG -> (foreground (S', S') bool, valid (S', S') bool), resized to `size`
    square by nearest and cropped like the image. DAVIS: foreground = value > 0 (object ids of a
    palette PNG, or 0/255 masks), every pixel valid. VOC: foreground = ids 1..254, 255 invalid."""
    try:
        with Image.open(path) as annotation:
            if annotation.mode not in ("P", "L", "1", "I", "I;16"):
                annotation = annotation.convert("L")
            ids = np.array(annotation.resize((size, size), Image.NEAREST)).astype(np.int64)
    except (OSError, SyntaxError) as error:
        raise SegmentationInputError(f"{path}: unreadable annotation ({error})") from error
    side = size // patch_size * patch_size
    return foreground_and_valid(ids[:side, :side], layout)


def foreground_and_valid(ids: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Annotation values (H, W) -> (foreground (H, W) bool, valid (H, W) bool). DAVIS: foreground
    = value > 0, every pixel valid. VOC: foreground = ids 1..254, VOC_IGNORE (255) invalid."""
    if layout == "voc":
        valid = ids != VOC_IGNORE
        return (ids > 0) & valid, valid
    return ids > 0, np.ones_like(ids, dtype=bool)


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------

def jaccard(masks: np.ndarray | torch.Tensor, truth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """masks (..., H, W) bool, truth (H, W) bool, valid (H, W) bool or None (all valid) ->
    Jaccard (...) in [0, 1]: |mask AND truth| / |mask OR truth| counted over valid pixels; 1 where
    both are empty there."""
    masks = np.asarray(masks, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if valid is not None:
        masks = masks & valid
        truth = truth & valid
    intersection = (masks & truth).sum(axis=(-2, -1))
    union = (masks | truth).sum(axis=(-2, -1))
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def centre_square(height: int, width: int, area_fraction: float) -> np.ndarray:
    """(height, width) bool: a centred square covering `area_fraction` of the image (its side
    rounded to whole pixels, at most the shorter side)."""
    side = min(round(math.sqrt(max(area_fraction, 0.0) * height * width)), height, width)
    square = np.zeros((height, width), dtype=bool)
    top, left = (height - side) // 2, (width - side) // 2
    square[top:top + side, left:left + side] = True
    return square


# ----------------------------------------------------------------------------------------------
# Overlays
# ----------------------------------------------------------------------------------------------

TRUTH_COLOUR = (255, 214, 0)
MASK_COLOUR = (0, 190, 255)


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W) bool -> the pixels within `width` of the mask's border, inside it (bool)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def overlay_picture(image: np.ndarray, truth: np.ndarray, mask: np.ndarray, score: float) -> np.ndarray:
    """(S, S, 3) uint8 image, truth and mask (S, S) bool -> (S, 2S, 3) uint8: the image with the
    ground truth's outline (left), and the mask of the averaged attention tinted over it, the
    rest dimmed, with the same outline and the image's Jaccard (right)."""
    from PIL import ImageDraw

    edge = outline(truth)
    left = image.copy()
    left[edge] = TRUTH_COLOUR
    tinted = (0.55 * image + 0.45 * np.array(MASK_COLOUR)).astype(np.uint8)
    right = np.where(mask[..., None], tinted, (image * 0.35).astype(np.uint8))
    right[edge] = TRUTH_COLOUR
    picture = Image.fromarray(np.concatenate([left, right], axis=1))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((image.shape[1] + 2, 2, image.shape[1] + 92, 16), fill=(0, 0, 0))
    draw.text((image.shape[1] + 5, 4), f"J = {100 * score:.1f}%", fill=(255, 255, 255))
    return np.array(picture)


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------

@dataclass
class Accumulator:
    """Per-image results, kept small: Jaccards and mask areas, truths bit-packed (for the prior)."""

    head_scores: list[np.ndarray]
    mean_scores: list[float]
    mean_areas: list[float]
    truths: list[tuple[np.ndarray, np.ndarray | None, tuple[int, int]]]
    groups: list[str | None]


def _batches(samples: Sequence[Sample], batch_size: int) -> list[list[Sample]]:
    return [list(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def _decoded_batches(samples: Sequence[Sample], layout: str, image_size: int, patch_size: int,
                     batch_size: int) -> Iterator[tuple[list[Sample], list]]:
    """Yield (samples, [(image, pixels, truth, valid)]) per batch; the next batch decodes in a
    thread while the current one runs through the model."""

    def read(batch):
        decoded = []
        for sample in batch:
            image, pixels = read_image(sample.image, image_size, patch_size)
            truth, valid = read_truth(sample.annotation, layout, image_size, patch_size)
            decoded.append((image, pixels, truth, valid))
        return decoded

    batches = _batches(samples, batch_size)
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, batches[0]) if batches else None
        for index, batch in enumerate(batches):
            decoded = pending.result()
            pending = reader.submit(read, batches[index + 1]) if index + 1 < len(batches) else None
            yield batch, decoded


def _summary(head_scores: np.ndarray, mean_scores: np.ndarray) -> dict:
    per_head = 100 * head_scores.mean(axis=0)
    best = int(per_head.argmax())
    return {"per_head": [round(float(value), 4) for value in per_head],
            "mean_head": round(float(per_head.mean()), 4),
            "best_head": round(float(per_head[best]), 4), "best_head_index": best,
            "averaged_attention": round(float(100 * mean_scores.mean()), 4)}


def evaluate_attention_segmentation(model: nn.Module, samples: Sequence[Sample], layout: str,
                                    image_size: int = 480, threshold: float = 0.6, batch_size: int = 8,
                                    device: torch.device | str = "cpu", overlay_dir: str | Path | None = None,
                                    progress: bool = True, log: Callable[[str], None] | None = None,
                                    reference_interpolation: bool = False) -> dict:
    """Score `model`'s thresholded last-block attention against the ground truth of `samples`
    (see the module docstring). Returns the scores (percent) with `images`, `num_heads`,
    `patch_size`, `input_size` (S'), `centre_prior_area` (fraction of the image), `per_sequence`
    (DAVIS: sequence -> mean_head, averaged_attention, images), `seconds` and `images_per_s`
    (reading, forward, masks and scores; overlays excluded). With `overlay_dir`, one PNG per
    image: OVERLAY_DIR/NAME.png (`overlay_picture`). `reference_interpolation`: position embeddings
    interpolated as the reference does (scale factors with +0.1) instead of to the exact grid."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not samples:
        raise SegmentationInputError("no image to evaluate")
    vit = vit_backbone(model).to(device).eval()
    patch = int(vit.config.patch_size)
    side = image_size // patch * patch
    if side < patch:
        raise ValueError(f"image_size {image_size} is smaller than the patch size {patch}")
    overlay_dir = Path(overlay_dir) if overlay_dir is not None else None
    results = Accumulator([], [], [], [], [])
    overlay_seconds = 0.0
    start = time.perf_counter()
    with tqdm(total=len(samples), desc="attention masks", disable=not progress) as bar:
        for batch, decoded in _decoded_batches(samples, layout, image_size, patch, batch_size):
            pixels = torch.stack([item[1] for item in decoded]).to(device)
            with reference_pos_interpolation(vit, reference_interpolation):
                attention = cls_attention_and_feature(vit, pixels, return_feature=False)[0].float().cpu()  # (B, h, g, g)
            head_masks = upsample_to_image(attention_mass_masks(attention, threshold), patch).numpy()
            mean_masks = upsample_to_image(attention_mass_masks(attention.mean(dim=1), threshold), patch).numpy()
            for sample, (image, _, truth, valid), heads, mean_mask in zip(batch, decoded, head_masks, mean_masks):
                valid_or_none = None if valid.all() else valid
                results.head_scores.append(jaccard(heads, truth, valid_or_none))
                mean_score = float(jaccard(mean_mask, truth, valid_or_none))
                results.mean_scores.append(mean_score)
                results.mean_areas.append(float(mean_mask.mean()))
                results.truths.append((np.packbits(truth), None if valid_or_none is None else np.packbits(valid),
                                       truth.shape))
                results.groups.append(sample.group)
                if overlay_dir is not None:
                    began = time.perf_counter()
                    path = overlay_dir / f"{sample.name}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(overlay_picture(image, truth, mean_mask, mean_score)).save(path)
                    overlay_seconds += time.perf_counter() - began
            bar.update(len(batch))
    seconds = time.perf_counter() - start - overlay_seconds

    head_scores = np.stack(results.head_scores)  # (images, heads)
    mean_scores = np.asarray(results.mean_scores)
    area = float(np.mean(results.mean_areas))
    prior_scores = []
    for packed_truth, packed_valid, shape in results.truths:
        size = shape[0] * shape[1]
        truth = np.unpackbits(packed_truth, count=size).reshape(shape).astype(bool)
        valid = None if packed_valid is None else np.unpackbits(packed_valid, count=size).reshape(shape).astype(bool)
        prior_scores.append(float(jaccard(centre_square(*shape, area), truth, valid)))
    result = _summary(head_scores, mean_scores)
    result.update({"centre_prior": round(100 * float(np.mean(prior_scores)), 4), "centre_prior_area": round(area, 4),
                   "images": len(samples), "num_heads": int(head_scores.shape[1]), "patch_size": patch,
                   "input_size": side})
    groups = [group for group in dict.fromkeys(results.groups) if group is not None]
    if groups:
        per_sequence = {}
        for group in groups:
            rows = [i for i, g in enumerate(results.groups) if g == group]
            summary = _summary(head_scores[rows], mean_scores[rows])
            per_sequence[group] = {"mean_head": summary["mean_head"],
                                   "averaged_attention": summary["averaged_attention"], "images": len(rows)}
        result["per_sequence"] = per_sequence
    result["seconds"] = round(seconds, 3)
    result["images_per_s"] = round(len(samples) / seconds, 3) if seconds > 0 else None
    if log:
        log(f"{len(samples)} images in {seconds:.1f} s ({result['images_per_s']} images/s): mean head "
            f"{result['mean_head']:.2f}, best head {result['best_head']:.2f}, averaged attention "
            f"{result['averaged_attention']:.2f}, centre prior {result['centre_prior']:.2f}")
    return result
