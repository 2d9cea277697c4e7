"""J and F of semi-supervised video object segmentation, as the DAVIS toolkit scores them.

The definitions follow the official DAVIS-2017 evaluation (davis2017-evaluation):

- J (region similarity): the IoU of the predicted and annotated masks of one object; 1 when
  both are empty.
- F (contour accuracy): the F-measure of boundary precision and recall. Boundaries are the
  1-pixel maps of `mask_boundaries`; a boundary pixel is matched when the other mask's boundary
  lies within a disk of radius ceil(0.008 x image diagonal) pixels. Empty boundaries: both
  empty -> 1; only the prediction's empty -> 0; only the annotation's empty -> 0.
- Every object of a sequence is scored on every frame but the first (given) and the last.
- Per object: Mean, Recall (fraction of frames above 0.5) and Decay (mean of the first quarter
  minus the mean of the last quarter; the quarters are the toolkit's, see `quarter_bounds`).
- Summary: every statistic averaged over all objects of all sequences; J&F = (J-Mean + F-Mean) / 2.

`score_sequences` returns the numbers in percent (0-100) under the toolkit's names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np

BOUNDARY_TOLERANCE = 0.008  # fraction of the image diagonal
STATISTICS = ("Mean", "Recall", "Decay")


def region_similarity(annotation: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """J: IoU of boolean masks (..., H, W) -> (...) float64; 1.0 where both masks are empty."""
    if annotation.shape != prediction.shape:
        raise ValueError(f"annotation {annotation.shape} and prediction {prediction.shape} differ in size")
    annotation, prediction = annotation.astype(bool), prediction.astype(bool)
    intersection = np.logical_and(annotation, prediction).sum(axis=(-2, -1))
    union = np.logical_or(annotation, prediction).sum(axis=(-2, -1))
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def mask_boundaries(mask: np.ndarray) -> np.ndarray:
    """(H, W) mask -> (H, W) bool map of the pixels whose right, lower or lower-right neighbour
    differs from them (the boundary shifted half a pixel towards the origin). On the last row
    only the right neighbour is compared, on the last column only the lower one; the corner is 0."""
    mask = mask.astype(bool)
    right = np.zeros_like(mask)
    below = np.zeros_like(mask)
    below_right = np.zeros_like(mask)
    right[:, :-1] = mask[:, 1:]
    below[:-1, :] = mask[1:, :]
    below_right[:-1, :-1] = mask[1:, 1:]
    boundary = (mask ^ right) | (mask ^ below) | (mask ^ below_right)
    boundary[-1, :] = mask[-1, :] ^ right[-1, :]
    boundary[:, -1] = mask[:, -1] ^ below[:, -1]
    boundary[-1, -1] = False
    return boundary


def disk(radius: int) -> np.ndarray:
    """(2r + 1, 2r + 1) uint8 structuring element: the offsets (y, x) with y^2 + x^2 <= r^2."""
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2).astype(np.uint8)


def boundary_tolerance_pixels(height: int, width: int, tolerance: float = BOUNDARY_TOLERANCE) -> int:
    """Matching radius in pixels: ceil(tolerance x diagonal) (a tolerance >= 1 is already pixels)."""
    return int(tolerance) if tolerance >= 1 else int(math.ceil(tolerance * math.hypot(height, width)))


def boundary_f_measure(annotation: np.ndarray, prediction: np.ndarray,
                       tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """F: boundary F-measure of two (H, W) masks."""
    if annotation.shape != prediction.shape:
        raise ValueError(f"annotation {annotation.shape} and prediction {prediction.shape} differ in size")
    element = disk(boundary_tolerance_pixels(*annotation.shape[-2:], tolerance))
    predicted_boundary = mask_boundaries(prediction)
    annotated_boundary = mask_boundaries(annotation)
    predicted_count = int(predicted_boundary.sum())
    annotated_count = int(annotated_boundary.sum())
    if predicted_count == 0 or annotated_count == 0:
        # both empty: perfect; otherwise one of precision/recall is 0 and F is 0.
        return 1.0 if predicted_count == annotated_count else 0.0
    predicted_near = cv2.dilate(predicted_boundary.astype(np.uint8), element).astype(bool)
    annotated_near = cv2.dilate(annotated_boundary.astype(np.uint8), element).astype(bool)
    precision = np.logical_and(predicted_boundary, annotated_near).sum() / predicted_count
    recall = np.logical_and(annotated_boundary, predicted_near).sum() / annotated_count
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def quarter_bounds(num_frames: int) -> list[tuple[int, int]]:
    """The toolkit's four (start, stop) slices for Decay: stops at round(linspace(1, n, 5)) - 1,
    each quarter including the frame its successor starts on (neighbouring quarters share a frame)."""
    edges = (np.round(np.linspace(1, num_frames, 5) + 1e-10) - 1).astype(int)
    return [(int(edges[i]), int(edges[i + 1]) + 1) for i in range(4)]


def per_frame_statistics(values: Sequence[float]) -> dict[str, float]:
    """Per-frame scores of one object (fractions) -> {"Mean", "Recall", "Decay"} (fractions)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"Mean": math.nan, "Recall": math.nan, "Decay": math.nan}
    first, last = quarter_bounds(len(values))[0], quarter_bounds(len(values))[3]
    return {"Mean": float(np.nanmean(values)), "Recall": float(np.mean(values > 0.5)),
            "Decay": float(np.nanmean(values[first[0]:first[1]]) - np.nanmean(values[last[0]:last[1]]))}


def object_masks(labels: np.ndarray, num_objects: int) -> np.ndarray:
    """(..., H, W) integer label maps -> (num_objects, ..., H, W) bool, object ids 1..num_objects."""
    ids = np.arange(1, num_objects + 1).reshape(-1, *([1] * labels.ndim))
    return labels[None] == ids


def score_sequence(annotations: np.ndarray, predictions: np.ndarray,
                   tolerance: float = BOUNDARY_TOLERANCE) -> dict[str, np.ndarray]:
    """Per-object per-frame J and F of one sequence.

    annotations, predictions: (T, H, W) integer object ids, T >= 3, frame 0 the given one. The
    objects are 1..max id of the first annotation; scored frames 1..T-2. A predicted id above
    that is an error (as in the toolkit). Returns {"J": (objects, T-2), "F": (objects, T-2)}.
    """
    if annotations.shape != predictions.shape:
        raise ValueError(f"annotations {annotations.shape} and predictions {predictions.shape} differ in shape")
    if annotations.shape[0] < 3:
        raise ValueError(f"a sequence needs >= 3 frames to be scored (first and last are excluded), got "
                         f"{annotations.shape[0]}")
    num_objects = int(annotations[0].max())
    if int(predictions.max()) > num_objects:
        raise ValueError(f"prediction holds object id {int(predictions.max())}, the first annotation only "
                         f"{num_objects} objects")
    annotated = object_masks(annotations[1:-1], num_objects)
    predicted = object_masks(predictions[1:-1], num_objects)
    region = region_similarity(annotated, predicted)
    boundary = np.array([[boundary_f_measure(annotated[o, t], predicted[o, t], tolerance)
                          for t in range(annotated.shape[1])] for o in range(num_objects)]).reshape(region.shape)
    return {"J": region, "F": boundary}


def summarize(per_sequence_scores: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """{SEQ: score_sequence(...)} -> the toolkit's summary in percent.

    Keys: `J&F-Mean`, `J-Mean`, `J-Recall`, `J-Decay`, `F-Mean`, `F-Recall`, `F-Decay` (averages
    over all objects of all sequences), `per_sequence` (SEQ -> `J-Mean`, `F-Mean`, averaged over
    its objects) and `per_object` (`SEQ_i` -> `J-Mean`, `F-Mean`, as the toolkit's table).
    """
    object_statistics: dict[str, list[dict[str, float]]] = {"J": [], "F": []}
    per_sequence, per_object = {}, {}
    for sequence, scores in per_sequence_scores.items():
        sequence_means = {"J": [], "F": []}
        for index in range(scores["J"].shape[0]):
            entry = {}
            for measure in ("J", "F"):
                statistics = per_frame_statistics(scores[measure][index])
                object_statistics[measure].append(statistics)
                sequence_means[measure].append(statistics["Mean"])
                entry[f"{measure}-Mean"] = 100 * statistics["Mean"]
            per_object[f"{sequence}_{index + 1}"] = entry
        per_sequence[sequence] = {f"{m}-Mean": 100 * float(np.mean(sequence_means[m])) if sequence_means[m]
                                  else math.nan for m in ("J", "F")}
    summary = {}
    for measure in ("J", "F"):
        for statistic in STATISTICS:
            values = [entry[statistic] for entry in object_statistics[measure]]
            summary[f"{measure}-{statistic}"] = 100 * float(np.mean(values)) if values else math.nan
    result = {"J&F-Mean": (summary["J-Mean"] + summary["F-Mean"]) / 2}
    result.update(summary)
    result["per_sequence"] = per_sequence
    result["per_object"] = per_object
    return result


def score_sequences(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]],
                    tolerance: float = BOUNDARY_TOLERANCE) -> dict:
    """(SEQ, annotations (T, H, W), predictions (T, H, W)) pairs -> `summarize` of them."""
    return summarize({name: score_sequence(annotations, predictions, tolerance)
                      for name, annotations, predictions in pairs})
