"""J and F against hand-worked masks and against the official DAVIS toolkit's own functions."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hf_dino.evaluation.davis_metrics import (boundary_f_measure, boundary_tolerance_pixels, mask_boundaries,
                                              per_frame_statistics, quarter_bounds, region_similarity,
                                              score_sequence, score_sequences)

REFERENCE_PYTHON = Path("/work/refvenv/bin/python")
TOOLKIT_ROOT = Path("/work/ref/davis2017-evaluation")


def square(size=(100, 100), top=20, left=20, side=10):
    mask = np.zeros(size, dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def left_part(columns, size=(100, 100)):
    mask = np.zeros(size, dtype=bool)
    mask[:, :columns] = True
    return mask


def test_perfect_prediction_scores_one():
    mask = square()
    assert region_similarity(mask, mask) == 1.0
    assert boundary_f_measure(mask, mask) == 1.0


def test_empty_prediction_scores_zero_and_both_empty_score_one():
    mask, empty = square(), np.zeros((100, 100), dtype=bool)
    assert region_similarity(mask, empty) == 0.0
    assert boundary_f_measure(mask, empty) == 0.0
    assert boundary_f_measure(empty, mask) == 0.0
    assert region_similarity(empty, empty) == 1.0
    assert boundary_f_measure(empty, empty) == 1.0


def test_square_shifted_one_pixel():
    # 10 x 10 square moved one column right: overlap 9 x 10, union 11 x 10; every boundary
    # pixel lies 1 pixel from the other's, inside the 2-pixel tolerance of a 100 x 100 image.
    annotation, prediction = square(), square(left=21)
    assert region_similarity(annotation, prediction) == pytest.approx(90 / 110)
    assert boundary_f_measure(annotation, prediction) == 1.0


def test_square_boundary_is_the_half_pixel_shifted_ring():
    # a 10 x 10 square's boundary: its last column and last row (19 pixels) and the column left
    # of it and the row above it, corner included (21 pixels)
    boundary = mask_boundaries(square())
    assert boundary.sum() == 40
    assert boundary[20:30, 29].all() and boundary[29, 20:30].all()
    assert boundary[19:30, 19].all() and boundary[19, 19:30].all()
    assert not boundary[20:29, 20:29].any()


@pytest.mark.parametrize("size, tolerance_pixels", [((100, 100), 2), ((480, 854), 8)])
def test_boundary_tolerance_is_0_008_of_the_diagonal(size, tolerance_pixels):
    # ceil(0.008 * hypot(100, 100) = 1.13) = 2; ceil(0.008 * hypot(480, 854) = 7.84) = 8
    assert boundary_tolerance_pixels(*size) == tolerance_pixels
    annotation = left_part(40, size)  # boundary: column 39, every row
    within = left_part(40 + tolerance_pixels, size)
    beyond = left_part(40 + tolerance_pixels + 1, size)
    assert boundary_f_measure(annotation, within) == 1.0
    assert boundary_f_measure(annotation, beyond) == 0.0
    assert region_similarity(annotation, beyond) == pytest.approx(40 / (41 + tolerance_pixels))


def test_boundary_half_matched():
    # annotation boundary: column 39 on all 100 rows. Prediction: the same half-plane in rows
    # 0-49 and one 10 columns wider in rows 50-99, so its boundary is column 39 (rows 0-49),
    # the step row 49 at columns 40-49 (their lower neighbour differs) and column 49 (rows
    # 50-99): 110 pixels, of which column 39 (50) and columns 40-41 of row 49 (2) lie within
    # 2 pixels of the annotation's boundary -> precision 52/110. Annotation pixels within 2
    # pixels of the prediction's boundary: rows 0-49, and rows 50-51 (1 and 2 below (49, 39))
    # -> recall 52/100; F = 2 * 52 / (110 + 100).
    annotation = left_part(40)
    prediction = left_part(40)
    prediction[50:, :50] = True
    assert boundary_f_measure(annotation, prediction) == pytest.approx(104 / 210)


def test_decay_quarters_and_statistics():
    # 10 frames: linspace(1, 10, 5) = 1, 3.25, 5.5, 7.75, 10 -> rounded 1, 3, 6, 8, 10 -> minus 1
    assert quarter_bounds(10) == [(0, 3), (2, 6), (5, 8), (7, 10)]
    values = np.arange(10) / 10
    statistics = per_frame_statistics(values)
    assert statistics["Mean"] == pytest.approx(0.45)
    assert statistics["Recall"] == pytest.approx(0.4)  # 0.6, 0.7, 0.8, 0.9 (0.5 is not above 0.5)
    assert statistics["Decay"] == pytest.approx(0.1 - 0.8)


def test_first_and_last_frames_are_excluded_and_objects_averaged():
    annotations = np.zeros((4, 100, 100), dtype=np.uint8)
    annotations[:, 20:30, 20:30] = 1
    annotations[:, 60:70, 60:70] = 2
    predictions = annotations.copy()
    predictions[0] = 0  # the given frame and the last frame do not count
    predictions[3] = 2
    predictions[1:3][predictions[1:3] == 2] = 0  # object 2 missed on the scored frames
    scores = score_sequence(annotations, predictions)
    assert scores["J"].shape == (2, 2)
    np.testing.assert_array_equal(scores["J"], [[1, 1], [0, 0]])
    result = score_sequences([("seq", annotations, predictions)])
    assert result["J-Mean"] == pytest.approx(50.0)
    assert result["F-Mean"] == pytest.approx(50.0)
    assert result["J&F-Mean"] == pytest.approx(50.0)
    assert result["per_sequence"]["seq"] == {"J-Mean": pytest.approx(50.0), "F-Mean": pytest.approx(50.0)}
    assert result["per_object"]["seq_2"]["J-Mean"] == 0.0


def test_perfect_sequence_is_100_and_extra_object_is_an_error():
    annotations = np.zeros((5, 50, 60), dtype=np.uint8)
    annotations[:, 10:20, 10:30] = 1
    assert score_sequences([("s", annotations, annotations)])["J&F-Mean"] == 100.0
    wrong = annotations.copy()
    wrong[2, 0, 0] = 2
    with pytest.raises(ValueError, match="object id 2"):
        score_sequence(annotations, wrong)


@pytest.mark.skipif(not (REFERENCE_PYTHON.exists() and TOOLKIT_ROOT.is_dir()), reason="no DAVIS toolkit venv")
def test_same_numbers_as_the_official_toolkit(tmp_path):
    rng = np.random.default_rng(0)
    frames, height, width = 9, 60, 90
    annotations = np.zeros((frames, height, width), dtype=np.uint8)
    predictions = np.zeros_like(annotations)
    for t in range(frames):  # two moving blobs, predictions jittered and eroded at random
        for obj, (row, col) in enumerate([(15, 10 + 3 * t), (35, 70 - 2 * t)], start=1):
            rr, cc = np.ogrid[:height, :width]
            annotations[t][(rr - row) ** 2 + (cc - col) ** 2 <= 64] = obj
            dr, dc = rng.integers(-4, 5, size=2)
            radius = rng.integers(4, 10)
            predictions[t][(rr - row - dr) ** 2 + (cc - col - dc) ** 2 <= radius ** 2] = obj
    predictions[4][predictions[4] == 2] = 0  # an object missed on one frame
    np.savez(tmp_path / "masks.npz", annotations=annotations, predictions=predictions)
    script = f"""
import json, sys
import numpy as np
sys.path.insert(0, {str(TOOLKIT_ROOT)!r})
from davis2017.metrics import db_eval_iou, db_eval_boundary
from davis2017.utils import db_statistics
data = np.load({str(tmp_path / 'masks.npz')!r})
gt, res = data['annotations'][1:-1], data['predictions'][1:-1]
out = {{}}
for obj in (1, 2):
    j = db_eval_iou(gt == obj, res == obj)
    f = db_eval_boundary(gt == obj, res == obj)
    out[obj] = {{'J': j.tolist(), 'F': f.tolist(), 'Jstat': list(map(float, db_statistics(j))),
                'Fstat': list(map(float, db_statistics(f)))}}
print(json.dumps(out))
"""
    completed = subprocess.run([str(REFERENCE_PYTHON), "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    toolkit = json.loads(completed.stdout)
    scores = score_sequence(annotations, predictions)
    for index, obj in enumerate(("1", "2")):
        np.testing.assert_allclose(scores["J"][index], toolkit[obj]["J"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(scores["F"][index], toolkit[obj]["F"], rtol=0, atol=1e-12)
        for measure in ("J", "F"):
            ours = per_frame_statistics(scores[measure][index])
            np.testing.assert_allclose([ours["Mean"], ours["Recall"], ours["Decay"]], toolkit[obj][f"{measure}stat"],
                                       atol=1e-12)
    assert 0 < scores["F"].mean() < 1 and 0 < scores["J"].mean() < 1
