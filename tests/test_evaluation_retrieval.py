"""Image retrieval on the revisitop layout: preprocessing as the reference's, the multiscale
feature against its formula, end to end on DAVIS frames (a query's positives are the frames of
its own sequence) against a whole-matrix ranking, and bad input."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import conftest
from hf_dino.commands.eval_image_retrieval import main
from hf_dino.evaluation.retrieval import ThumbnailTransform, multiscale_cls_feature
from hf_dino.evaluation.revisitop import compute_map, load_ground_truth

DAVIS = conftest.DAVIS / "JPEGImages" / "480p"
SEQUENCES = ("blackswan", "car-shadow")
JSON_KEYS = {"mAP_E", "mAP_M", "mAP_H", "mP@1_M", "mP@5_M", "mP@10_M", "mP@1_H", "mP@5_H", "mP@10_H"}


def test_thumbnail_keeps_aspect_and_never_enlarges():
    assert ThumbnailTransform(224)(Image.new("RGB", (300, 200))).shape == (3, 149, 224)
    assert ThumbnailTransform(224)(Image.new("RGB", (120, 500))).shape == (3, 224, 54)
    assert ThumbnailTransform(224)(Image.new("RGB", (100, 80))).shape == (3, 80, 100)


class SizeReporter(nn.Module):
    """Stand-in backbone whose feature is (height, width, 1) of its input."""

    def backbone_features(self, pixel_values):
        height, width = pixel_values.shape[-2:]
        return torch.tensor([[float(height), float(width), 1.0]])


def test_multiscale_is_the_normalised_mean_over_three_scales():
    feature = multiscale_cls_feature(SizeReporter(), torch.zeros(1, 3, 64, 96))
    # scales 1, 1/sqrt(2), 1/2: heights 64, 45, 32 and widths 96, 67, 48 (floored)
    expected = np.array([(64 + 45 + 32) / 3, (96 + 67 + 48) / 3, 1.0])
    np.testing.assert_allclose(feature.numpy()[0], expected / np.linalg.norm(expected), rtol=1e-6)


def build_davis_retrieval(root: Path) -> None:
    """ROOT/davis/jpg + gnd_davis.pkl: 6 database frames and 1 query per sequence; a query's own
    sequence: its 3 nearest frames easy, the next 2 hard, the farthest junk."""
    images = root / "davis" / "jpg"
    images.mkdir(parents=True)
    imlist, qimlist, gnd = [], [], []
    for sequence in SEQUENCES:
        frames = sorted((DAVIS / sequence).glob("*.jpg"))
        for frame in frames[4:40:6]:
            imlist.append(f"{sequence}_{frame.stem}")
            shutil.copy(frame, images / f"{imlist[-1]}.jpg")
        qimlist.append(f"query_{sequence}")
        shutil.copy(frames[0], images / f"{qimlist[-1]}.jpg")
        own = [index for index, name in enumerate(imlist) if name.startswith(sequence)]
        gnd.append({"easy": np.array(own[:3]), "hard": np.array(own[3:5]), "junk": np.array(own[5:]),
                    "bbx": np.array([0.0, 0.0, 100.0, 100.0])})
    with open(root / "davis" / "gnd_davis.pkl", "wb") as handle:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle)


@pytest.fixture
def davis_root(tmp_path):
    if not DAVIS.is_dir():
        pytest.skip("../shared/data/davis is absent")
    build_davis_retrieval(tmp_path)
    return tmp_path


def run(argv, capsys):
    main(argv)
    return json.loads(capsys.readouterr().out)


def whole_matrix_scores(model_dir: Path, root: Path, imsize: int) -> dict:
    """Independent path: PIL thumbnail -> ViT CLS -> full similarity -> argsort -> compute_map."""
    from transformers import ViTModel

    model = ViTModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    ground_truth = load_ground_truth(root / "davis" / "gnd_davis.pkl")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def feature(name):
        image = Image.open(root / "davis" / "jpg" / f"{name}.jpg").convert("RGB")
        image.thumbnail((imsize, imsize), Image.LANCZOS)
        pixels = torch.tensor(((np.asarray(image) / 255.0 - mean) / std).transpose(2, 0, 1)[None], dtype=torch.float32)
        with torch.no_grad():
            cls = model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[0, 0]
        return cls / cls.norm()

    database = torch.stack([feature(name) for name in ground_truth.imlist])
    queries = torch.stack([feature(name) for name in ground_truth.qimlist])
    ranks = np.argsort(-(database @ queries.T).numpy(), axis=0, kind="stable")
    return {protocol: 100 * compute_map(ranks, ground_truth.protocol(protocol), (1, 5, 10))["mAP"]
            for protocol in "EMH"}


def test_end_to_end_on_davis_frames(saved_tiny_vit, davis_root, tmp_path, capsys):
    output = tmp_path / "result.json"
    result = run(["--model", str(saved_tiny_vit), "--data_path", str(davis_root), "--dataset", "davis", "--imsize", "64",
                  "--num_workers", "0", "--output_json", str(output)], capsys)
    assert JSON_KEYS <= set(result) and json.loads(output.read_text()) == result
    expected = whole_matrix_scores(saved_tiny_vit, davis_root, 64)
    for protocol in "EMH":
        assert result[f"mAP_{protocol}"] == pytest.approx(expected[protocol], abs=0.01)
    # the two sequences (a swan on water, a car on a road) are told apart even by a random ViT
    assert result["mAP_M"] > 90 and result["mP@1_M"] == 100
    assert all(0 <= result[key] <= 100 for key in JSON_KEYS)


def test_multiscale_and_feature_cache(saved_tiny_vit, davis_root, tmp_path, capsys):
    argv = ["--model", str(saved_tiny_vit), "--data_path", str(davis_root), "--dataset", "davis", "--imsize", "64",
            "--multiscale", "--num_workers", "0", "--features_cache", str(tmp_path / "cache")]
    first = run(argv, capsys)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    # the second run reads features, not images: a now-broken image is not even opened
    (davis_root / "davis" / "jpg" / "query_blackswan.jpg").write_bytes(b"broken")
    assert run(argv, capsys) == first


def test_ground_truth_naming_a_missing_image(saved_tiny_vit, davis_root, tmp_path, capsys):
    (davis_root / "davis" / "jpg" / "car-shadow_00010.jpg").unlink()
    output = tmp_path / "result.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(saved_tiny_vit), "--data_path", str(davis_root), "--dataset", "davis",
              "--output_json", str(output)])
    assert exit_info.value.code == 2 and not output.exists()
    assert "car-shadow_00010.jpg" in capsys.readouterr().err


def test_unreadable_image_stops_without_a_score(saved_tiny_vit, davis_root, tmp_path, capsys):
    (davis_root / "davis" / "jpg" / "blackswan_00010.jpg").write_bytes(b"\xff\xd8 truncated")
    output = tmp_path / "result.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(saved_tiny_vit), "--data_path", str(davis_root), "--dataset", "davis", "--imsize", "64",
              "--num_workers", "0", "--output_json", str(output)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and not output.exists() and "mAP" not in captured.out
    assert "blackswan_00010.jpg" in captured.err


@pytest.mark.parametrize("setup, message", [
    ("empty", "gnd_davis.pkl"),
    ("malicious", "refusing to load"),
])
def test_bad_dataset_folders(tmp_path, saved_tiny_vit, capsys, setup, message):
    folder = tmp_path / "davis"
    (folder / "jpg").mkdir(parents=True)
    if setup == "malicious":
        (folder / "gnd_davis.pkl").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(saved_tiny_vit), "--data_path", str(tmp_path), "--dataset", "davis"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
