"""DAVIS label propagation: protocol pieces against hand-worked values and a from-scratch dense
version of the reference's propagation, mechanics on downscaled real DAVIS frames, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conftest
from hf_dino.evaluation.video_segmentation import (DavisInputError, PropagationSettings, davis_palette,
                                                   evaluate_davis, image_set_names, labels_to_ids, load_sequence,
                                                   propagate_labels, read_annotation, reference_interpolation,
                                                   resized_shape, segment_sequence)

DAVIS = conftest.DAVIS
needs_davis = pytest.mark.skipif(not (DAVIS / "JPEGImages").is_dir(), reason="no DAVIS sample in ../shared/data/davis")


def tiny_vit(patch_size=16, seed=0):
    return conftest.tiny_vit(seed, image_size=4 * patch_size, patch_size=patch_size)


def dense_reference_propagation(target, context, labels, grid, topk, temperature, neighborhood):
    """The reference's algorithm written out densely: exp(similarity / T) for every (context
    patch, target patch) pair, zero outside the window, keep entries >= the k-th largest of each
    target patch's column, normalise, multiply the labels."""
    height, width = grid
    num_context, num_patches, _ = context.shape
    affinity = torch.exp(torch.einsum("nd,cmd->cmn", target, context) / temperature)  # (C, keys, queries)
    if neighborhood > 0:
        window = torch.zeros(num_patches, num_patches)
        for key in range(num_patches):
            for query in range(num_patches):
                if (abs(key // width - query // width) <= neighborhood
                        and abs(key % width - query % width) <= neighborhood):
                    window[key, query] = 1
        affinity = affinity * window
    affinity = affinity.reshape(num_context * num_patches, num_patches)
    kth = affinity.topk(topk, dim=0).values.min(dim=0).values
    affinity = torch.where(affinity >= kth, affinity, torch.zeros_like(affinity))
    affinity = affinity / affinity.sum(dim=0, keepdim=True)
    flat_labels = labels.permute(1, 0, 2).reshape(labels.shape[1], -1)  # (L, C * keys)
    return flat_labels @ affinity


@pytest.mark.parametrize("neighborhood", [0, 1, 3])
def test_propagation_matches_the_dense_reference_algorithm_chunked_or_not(neighborhood):
    generator = torch.Generator().manual_seed(neighborhood)
    grid, num_context, dim, num_labels = (7, 9), 3, 16, 3
    features = torch.nn.functional.normalize(torch.randn(num_context + 1, 63, dim, generator=generator), dim=-1)
    labels = torch.softmax(torch.randn(num_context, num_labels, 63, generator=generator), dim=1)
    expected = dense_reference_propagation(features[0], features[1:], labels, grid, 5, 0.1, neighborhood)
    whole = propagate_labels(features[0], features[1:], labels, grid, topk=5, temperature=0.1,
                             neighborhood=neighborhood, chunk_rows=grid[0])
    row_by_row = propagate_labels(features[0], features[1:], labels, grid, topk=5, temperature=0.1,
                                  neighborhood=neighborhood, chunk_rows=1)
    tiny_budget = propagate_labels(features[0], features[1:], labels, grid, topk=5, temperature=0.1,
                                   neighborhood=neighborhood, memory_mb=0.01)
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(row_by_row, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tiny_budget, whole, rtol=1e-6, atol=1e-7)


def test_identical_frame_reproduces_the_first_labels():
    grid = (4, 6)
    features = torch.nn.functional.normalize(torch.randn(24, 8), dim=-1)
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 3, (24,)), 3).T.float()
    propagated = propagate_labels(features, features[None], one_hot[None], grid, topk=1, temperature=0.1,
                                  neighborhood=2)
    torch.testing.assert_close(propagated, one_hot)


def test_resized_shape_follows_the_reference():
    assert resized_shape(480, 854, 16) == (480, 832)  # 854 * 480/480 floored to a multiple of 64
    assert resized_shape(480, 854, 8) == (480, 832)
    assert resized_shape(854, 480, 16) == (832, 480)  # portrait
    assert resized_shape(1080, 1920, 16) == (480, 832)  # 853.3 -> 832
    assert resized_shape(480, 854, 14) == (476, 826)  # 14 divides neither 480 nor 832: floored


def test_labels_to_ids_upsamples_normalises_and_takes_argmax():
    # background channel everywhere 0.6 except 0.2 at patch (0, 1); object channel 0.3 there and 0.1
    # elsewhere: raw argmax would be background everywhere, the per-channel min-max makes (0, 1)
    # the object (1.0 vs 0.0) and everything else background (1.0 vs 0.0).
    soft = torch.tensor([[[0.6, 0.2], [0.6, 0.6]], [[0.1, 0.3], [0.1, 0.1]]])
    ids = labels_to_ids(soft, patch_size=4, original=(8, 8))
    assert ids.shape == (8, 8)
    assert ids[:3, 5:].all() and ids[5:, :].sum() == 0 and ids[:, :3].sum() == 0


def test_reference_interpolation_adds_0_1_to_the_scale():
    grid, dim = 4, 3
    position = torch.randn(1, 1 + grid * grid, dim)
    interpolated = reference_interpolation(position, 6 * 16, 10 * 16, 16)
    expected = torch.nn.functional.interpolate(position[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2),
                                               scale_factor=(6.1 / 4, 10.1 / 4), mode="bicubic")
    assert interpolated.shape == (1, 61, dim)
    torch.testing.assert_close(interpolated[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 60, dim))
    exact = torch.nn.functional.interpolate(position[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2),
                                            size=(6, 10), mode="bicubic")
    assert not torch.allclose(expected, exact)  # the quirk does move the embeddings


def small_davis(root: Path, frames=5, scale=0.25, sequences=("blackswan", "car-shadow"), palette_objects=False):
    """A DAVIS copy of the first `frames` frames, downscaled by `scale`."""
    for name in sequences:
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True)
        for index in range(frames):
            frame = Image.open(DAVIS / "JPEGImages" / "480p" / name / f"{index:05d}.jpg")
            size = (int(frame.width * scale), int(frame.height * scale))
            frame.resize(size, Image.BILINEAR).save(root / "JPEGImages" / "480p" / name / f"{index:05d}.jpg")
            mask = Image.open(DAVIS / "Annotations" / "480p" / name / f"{index:05d}.png").resize(size, Image.NEAREST)
            if palette_objects:  # DAVIS-2017 style: two objects (left / right half of the mask)
                ids = (np.array(mask) == 255).astype(np.uint8)
                ids[:, size[0] // 2:] *= 2
                mask = Image.fromarray(ids, mode="P")
                mask.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 90] + [0] * 759)
            mask.save(root / "Annotations" / "480p" / name / f"{index:05d}.png")
    return root


@needs_davis
def test_davis2016_image_set_is_read():
    assert image_set_names(DAVIS) == ["car-shadow", "blackswan"]


@needs_davis
def test_binary_masks_on_downscaled_davis(tmp_path):
    root = small_davis(tmp_path / "davis", sequences=("blackswan",))
    sequence = load_sequence(root, "blackswan")
    result = segment_sequence(tiny_vit(), sequence, tmp_path / "out", progress=False)
    written = sorted((tmp_path / "out" / "blackswan").glob("*.png"))
    assert [p.name for p in written] == [f"{i:05d}.png" for i in range(5)]
    first_truth = (np.array(Image.open(root / "Annotations" / "480p" / "blackswan" / "00000.png")) == 255)
    for path, predicted in zip(written, result.predictions):
        image = Image.open(path)
        assert image.mode == "P" and image.size == (213, 120)
        np.testing.assert_array_equal(np.array(image), predicted)
        assert set(np.unique(predicted)) <= {0, 1}
        assert np.array(image.getpalette()[:6]).tolist() == [0, 0, 0, 128, 0, 0]  # DAVIS palette for 0/255 masks
    np.testing.assert_array_equal(result.predictions[0], first_truth)
    assert not (tmp_path / "out" / ".blackswan.partial").exists()


@needs_davis
def test_palette_annotations_with_two_objects(tmp_path):
    root = small_davis(tmp_path / "davis", frames=4, sequences=("car-shadow",), palette_objects=True)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("car-shadow\n")
    settings = PropagationSettings(n_last_frames=2, size_mask_neighborhood=4, affinity_memory_mb=0.05)
    result = evaluate_davis(tiny_vit(), root, tmp_path / "out", settings=settings, progress=False)
    first = np.array(Image.open(root / "Annotations" / "480p" / "car-shadow" / "00000.png"))
    written = [Image.open(tmp_path / "out" / "car-shadow" / f"{i:05d}.png") for i in range(4)]
    assert set(np.unique(first)) == {0, 1, 2}
    np.testing.assert_array_equal(np.array(written[0]), first)
    for image in written:
        assert image.getpalette()[:9] == [0, 0, 0, 10, 200, 30, 250, 5, 90]
        assert set(np.unique(np.array(image))) <= {0, 1, 2}
    assert set(result["per_object"]) == {"car-shadow_1", "car-shadow_2"}
    for key in ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"):
        assert 0 <= abs(result[key]) <= 100
    assert result["frames"] == 3


@needs_davis
def test_bad_input_names_the_file(tmp_path):
    root = small_davis(tmp_path / "davis", frames=3, sequences=("blackswan",))
    annotations = root / "Annotations" / "480p" / "blackswan"
    frames = root / "JPEGImages" / "480p" / "blackswan"

    (annotations / "00000.png").rename(tmp_path / "first.png")
    with pytest.raises(DavisInputError, match=r"00000\.png: missing first-frame annotation"):
        load_sequence(root, "blackswan")
    Image.open(tmp_path / "first.png").resize((50, 40)).save(annotations / "00000.png")
    with pytest.raises(DavisInputError, match=r"00000\.png: annotation is 50x40 but frame .*00000\.jpg is 213x120"):
        load_sequence(root, "blackswan")
    (tmp_path / "first.png").replace(annotations / "00000.png")

    (frames / "00002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DavisInputError, match=r"00002\.jpg: unreadable image"):
        load_sequence(root, "blackswan")

    (root / "JPEGImages" / "480p" / "empty").mkdir()
    with pytest.raises(DavisInputError, match=r"empty: empty sequence"):
        load_sequence(root, "empty")


@needs_davis
def test_frame_unreadable_only_when_decoded_leaves_no_partial_output(tmp_path, monkeypatch):
    root = small_davis(tmp_path / "davis", frames=3, sequences=("blackswan",))
    sequence = load_sequence(root, "blackswan")
    import cv2

    real_imread = cv2.imread
    monkeypatch.setattr(cv2, "imread", lambda path, *a: None if path.endswith("00002.jpg") else real_imread(path, *a))
    with pytest.raises(DavisInputError, match=r"00002\.jpg: unreadable frame"):
        segment_sequence(tiny_vit(), sequence, tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


@needs_davis
def test_command_line_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    from hf_dino.commands.eval_video_segmentation import main

    root = small_davis(tmp_path / "davis", frames=3, sequences=("blackswan",))
    (root / "Annotations" / "480p" / "blackswan" / "00000.png").unlink()
    model_dir = tmp_path / "model"
    tiny_vit().save_pretrained(model_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model_dir), "--data_path", str(root), "--sequences", "blackswan",
              "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "00000.png: missing first-frame annotation" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@needs_davis
def test_command_line_reports_the_json_contract(tmp_path, capsys):
    from hf_dino.commands.eval_video_segmentation import main

    root = small_davis(tmp_path / "davis", frames=3, sequences=("car-shadow",))
    model_dir = tmp_path / "model"
    tiny_vit().save_pretrained(model_dir)
    main(["--model", str(model_dir), "--data_path", str(root), "--sequences", "car-shadow", "--output_dir",
          str(tmp_path / "out"), "--output_json", str(tmp_path / "result.json"), "--n_last_frames", "1"])
    result = json.loads((tmp_path / "result.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    for key in ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"):
        assert isinstance(result[key], float)
    assert result["J&F-Mean"] == pytest.approx((result["J-Mean"] + result["F-Mean"]) / 2)
    assert set(result["per_sequence"]["car-shadow"]) == {"J-Mean", "F-Mean"}
    assert sorted(p.name for p in (tmp_path / "out" / "car-shadow").iterdir()) == ["00000.png", "00001.png", "00002.png"]


def test_resnet_backbone_is_refused():
    from transformers import ResNetConfig, ResNetModel

    from hf_dino.evaluation.video_segmentation import video_backbone

    with pytest.raises(ValueError, match="needs a ViT backbone"):
        video_backbone(ResNetModel(ResNetConfig(hidden_sizes=[8, 8, 8, 8], embedding_size=8, depths=[1, 1, 1, 1])))


def test_davis_palette_is_the_pascal_colour_map():
    palette = davis_palette()
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert palette[255].tolist() == [224, 224, 192]


def test_read_annotation_binary_and_palette(tmp_path):
    binary = np.zeros((4, 5), dtype=np.uint8)
    binary[1:3, 1:4] = 255
    Image.fromarray(binary).save(tmp_path / "binary.png")
    ids, palette, is_binary = read_annotation(tmp_path / "binary.png")
    assert is_binary and palette is None and ids.tolist() == (binary == 255).astype(int).tolist()
    indexed = Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.uint8), mode="P")
    indexed.putpalette([0, 0, 0, 1, 2, 3] + [9] * 762)
    indexed.save(tmp_path / "indexed.png")
    ids, palette, is_binary = read_annotation(tmp_path / "indexed.png")
    assert not is_binary and ids.tolist() == [[0, 1], [2, 0]]  # 255 = void -> background, as the toolkit
    assert palette[1].tolist() == [1, 2, 3]


@pytest.mark.slow
@needs_davis
def test_whole_sequence_at_480p(tmp_path):
    """car-shadow, all 40 frames at 480p (832 x 480 network input, 854 x 480 PNGs)."""
    result = evaluate_davis(tiny_vit(), DAVIS, tmp_path, sequences=["car-shadow"], progress=False)
    written = sorted((tmp_path / "car-shadow").glob("*.png"))
    assert len(written) == 40 and result["frames"] == 39
    assert all(Image.open(p).size == (854, 480) and Image.open(p).mode == "P" for p in written[::13])
    first = np.array(Image.open(DAVIS / "Annotations" / "480p" / "car-shadow" / "00000.png")) == 255
    np.testing.assert_array_equal(np.array(Image.open(written[0])), first)
    assert result["unscored_sequences"] == [] and 0 <= result["J&F-Mean"] <= 100
