"""Copy detection on the Copydays layout: GeM and the whitening against their formulas, the
Holidays AP on hand-worked rankings, end to end on copies of DAVIS frames (PIL crops, rotation,
JPEG quality) against an independent whole-matrix computation, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conftest
from hf_dino.commands.eval_copy_detection import main
from hf_dino.evaluation.copy_detection import (block_mean_average_precision, fit_whitening, gem,
                                               holidays_average_precision, read_layout)

DAVIS = conftest.DAVIS / "JPEGImages" / "480p"


def test_gem_against_its_formula():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, -4.0]]])  # (B=1, T=2, D=2)
    expected = [((1 + 3**4) / 2) ** 0.25, ((2**4 + 1e-24) / 2) ** 0.25]  # negatives clamp to 1e-6
    torch.testing.assert_close(gem(tokens)[0], torch.tensor(expected))


def test_whitening_of_the_fitting_set():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=generator)
    features = torch.randn(4000, 6, generator=generator) @ mixing + torch.tensor([3.0, -1, 0, 2, 0, 1])
    whiten = fit_whitening(features)
    whitened = whiten(features).double()
    # centred by the mean, PCA of the uncentred second moment M: P M P^T = I, hence the whitened
    # set's covariance is I - (P mu)(P mu)^T
    projected_mean = whiten.projection.double() @ features.double().mean(0)
    covariance = whitened.T @ whitened / len(whitened)
    torch.testing.assert_close(covariance, torch.eye(6, dtype=torch.float64) - torch.outer(projected_mean, projected_mean),
                               atol=1e-4, rtol=1e-4)
    centred = features - features.mean(0)  # a zero-mean set: covariance ~ identity
    whitened = fit_whitening(centred)(centred).double()
    torch.testing.assert_close(whitened.T @ whitened / len(whitened), torch.eye(6, dtype=torch.float64),
                               atol=1e-4, rtol=1e-4)


def test_holidays_average_precision_by_hand():
    # positives at ranks 0 and 2 of 3 (the third not in the returned list): [(1 + 1) + (1/2 + 2/3)] / 2 / 3
    assert holidays_average_precision([0, 2], 3) == pytest.approx((2 + 0.5 + 2 / 3) / 6)
    assert holidays_average_precision([], 1) == 0.0
    indices = torch.tensor([[4, 1, 0], [2, 3, 1]])
    assert block_mean_average_precision(indices, [{1}, {2}]) == pytest.approx(((0 + 1 / 2) / 2 + 1) / 2)


def frame(sequence: str, index: int) -> Image.Image:
    return Image.open(sorted((DAVIS / sequence).glob("*.jpg"))[index]).convert("RGB")


def build_copydays(root: Path) -> None:
    """6 originals GGGG00.jpg (3 frames of each DAVIS sequence), strong copies GGGG01/02 (crop,
    rotation, JPEG 30; colour jitter), jpegqual/20 and crops/50 copies named as the originals,
    4 distractors and 10 whitening images (other frames)."""
    for folder in ("original", "strong", "jpegqual/20", "crops/50", "distractors", "whitening"):
        (root / folder).mkdir(parents=True)
    frames = [(sequence, index) for sequence in ("blackswan", "car-shadow") for index in (0, 18, 36)]
    for group, (sequence, index) in enumerate(frames):
        image = frame(sequence, index)
        name = f"{2000 + group:04d}"
        image.save(root / "original" / f"{name}00.jpg", quality=95)
        width, height = image.size
        image.crop((width // 8, height // 6, width - width // 5, height - height // 8)).rotate(
            12, expand=True).save(root / "strong" / f"{name}01.jpg", quality=30)
        image.resize((width // 3, height // 3)).transpose(Image.FLIP_LEFT_RIGHT).save(
            root / "strong" / f"{name}02.jpg", quality=50)
        image.save(root / "jpegqual" / "20" / f"{name}00.jpg", quality=20)
        image.crop((width // 4, height // 4, 3 * width // 4, 3 * height // 4)).save(
            root / "crops" / "50" / f"{name}00.jpg")
    for number, (sequence, index) in enumerate([(s, i) for s in ("blackswan", "car-shadow") for i in (9, 27)]):
        frame(sequence, index).save(root / "distractors" / f"d{number}.jpg")
    for number, (sequence, index) in enumerate([(s, i) for s in ("blackswan", "car-shadow") for i in range(3, 38, 8)]):
        frame(sequence, index).save(root / "whitening" / f"w{number}.jpg")


@pytest.fixture
def copydays_root(tmp_path):
    if not DAVIS.is_dir():
        pytest.skip("../shared/data/davis is absent")
    build_copydays(tmp_path / "copydays")
    return tmp_path / "copydays"


def independent_scores(model_dir: Path, root: Path, imsize: int) -> dict:
    """numpy / PIL path: square bicubic resize, CLS ++ (mean(x^4))^(1/4), whitening by numpy's eigh,
    full similarity, top 20, Holidays AP; positives by the first four characters."""
    from transformers import ViTModel

    model = ViTModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def features(folder):
        rows = []
        for path in sorted(folder.glob("*.jpg")):
            image = Image.open(path).convert("RGB").resize((imsize, imsize), Image.BICUBIC)
            pixels = torch.tensor(((np.asarray(image) / 255.0 - mean) / std).transpose(2, 0, 1)[None],
                                  dtype=torch.float32)
            with torch.no_grad():
                tokens = model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[0].numpy()
            patches = np.maximum(tokens[1:].astype(np.float64), 1e-6)
            rows.append(np.concatenate([tokens[0], np.mean(patches**4, axis=0) ** 0.25]))
        return np.array(rows), [path.name for path in sorted(folder.glob("*.jpg"))]

    whitening, _ = features(root / "whitening")
    eigenvalues, eigenvectors = np.linalg.eigh(whitening.T @ whitening / len(whitening))
    eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-5)
    projection = np.diag(eigenvalues**-0.5) @ eigenvectors.T

    def prepared(matrix):
        matrix = (matrix - whitening.mean(0)) @ projection.T
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)

    originals, original_names = features(root / "original")
    distractors, _ = features(root / "distractors")
    database = prepared(np.concatenate([originals, distractors]))
    scores = {}
    for block in ("strong", "jpegqual/20", "crops/50"):
        queries, names = features(root / block)
        similarity = prepared(queries) @ database.T
        total = 0.0
        for row, name in zip(similarity, names):
            ranking = np.argsort(-row)[:20]
            positives = [i for i, original in enumerate(original_names) if original[:4] == name[:4]]
            found = [rank for rank, index in enumerate(ranking) if index in positives]
            total += sum(((k / rank if rank else 1.0) + (k + 1) / (rank + 1)) / 2 for k, rank in enumerate(found)) \
                / len(positives)
        scores[block] = 100 * total / len(names)
    return scores


def test_end_to_end_on_copies_of_davis_frames(saved_tiny_vit, copydays_root, tmp_path, capsys):
    whitening = copydays_root / "whitening"
    output = tmp_path / "copydays.json"
    main(["--model", str(saved_tiny_vit), "--data_path", str(copydays_root), "--imsize", "64", "--whitening_data",
          str(whitening), "--num_workers", "0", "--batch_size", "4", "--output_json", str(output)])
    result = json.loads(capsys.readouterr().out)
    assert json.loads(output.read_text()) == result
    assert {"mAP", "mAP_jpegqual/20", "mAP_crops/50"} <= set(result)
    assert result["num_database"] == 10 and result["num_queries"]["strong"] == 12
    expected = independent_scores(saved_tiny_vit, copydays_root, 64)
    assert result["mAP"] == pytest.approx(expected["strong"], abs=0.01)
    assert result["mAP_jpegqual/20"] == pytest.approx(expected["jpegqual/20"], abs=0.01)
    assert result["mAP_crops/50"] == pytest.approx(expected["crops/50"], abs=0.01)
    assert result["mAP_jpegqual/20"] == 100  # a JPEG-20 copy is still nearest to its original


def test_layout_blocks_and_positives(copydays_root):
    layout = read_layout(copydays_root)
    assert list(layout.query_blocks) == ["strong", "jpegqual/20", "crops/50"]
    assert len(layout.distractors) == 4
    assert layout.positives("strong")[:3] == [{0}, {0}, {1}]


@pytest.mark.parametrize("breakage, code, message", [
    ("no_strong", 2, "strong: no such folder"),
    ("empty_original", 2, "original: no image"),
    ("orphan_query", 2, "999901.jpg: no original shares"),
    ("unreadable", 1, "200101.jpg: cannot read"),
])
def test_bad_input(saved_tiny_vit, copydays_root, tmp_path, capsys, breakage, code, message):
    import shutil

    if breakage == "no_strong":
        shutil.rmtree(copydays_root / "strong")
    elif breakage == "empty_original":
        for path in (copydays_root / "original").iterdir():
            path.unlink()
    elif breakage == "orphan_query":
        shutil.copy(copydays_root / "strong" / "200001.jpg", copydays_root / "strong" / "999901.jpg")
    else:
        (copydays_root / "strong" / "200101.jpg").write_bytes(b"\xff\xd8\xff garbage")
    output = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(saved_tiny_vit), "--data_path", str(copydays_root), "--imsize", "32", "--num_workers", "0",
              "--output_json", str(output)])
    captured = capsys.readouterr()
    assert exit_info.value.code == code and message in captured.err
    assert not output.exists() and "mAP" not in captured.out
