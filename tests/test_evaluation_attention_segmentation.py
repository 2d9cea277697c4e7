"""The attention probe (hf_dino.evaluation.attention_segmentation): the mass rule on hand-made
attention vectors, Jaccard on hand-drawn masks (with VOC's ignored border), the centre prior, the
whole pipeline against figures computed with the reference's own code on the shared DAVIS
frames, the VOC layout against an independent from-scratch computation, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conftest
from hf_dino.visualization.attention import attention_mass_masks
from hf_dino.commands.eval_attention_segmentation import main
from hf_dino.evaluation.attention_segmentation import (centre_square, davis_samples, detect_layout, jaccard,
                                                       read_truth)
from hf_dino.evaluation.video_segmentation import davis_palette

DAVIS = conftest.DAVIS
needs_davis = pytest.mark.skipif(not (DAVIS / "JPEGImages").is_dir(), reason="no DAVIS sample in ../shared/data/davis")


# ----------------------------------------------------------------------------------------------
# The mass rule and the scores, on hand-worked numbers
# ----------------------------------------------------------------------------------------------

def test_mass_rule_keeps_the_fewest_top_patches_reaching_the_threshold():
    # shares 1/16, 4/16, 2/16, 8/16, 1/16 (exact in binary). 0.6: 8/16 alone is 0.5 < 0.6, with 4/16
    # 0.75 >= 0.6 -> patches 1 and 3. 0.75 is reached exactly by those two: the boundary patch (2/16)
    # is not added. 0.76 needs it. 1.0 keeps every patch.
    attention = torch.tensor([[1.0, 4.0, 2.0, 8.0, 1.0]]) / 16
    assert attention_mass_masks(attention, 0.6).nonzero()[:, 1].tolist() == [1, 3]
    assert attention_mass_masks(attention, 0.75).nonzero()[:, 1].tolist() == [1, 3]
    assert attention_mass_masks(attention, 0.76).nonzero()[:, 1].tolist() == [1, 2, 3]
    assert attention_mass_masks(attention, 0.5).nonzero()[:, 1].tolist() == [3]
    assert attention_mass_masks(attention, 1.0).all()
    # the total need not be 1: the rule uses shares of the map's own sum
    torch.testing.assert_close(attention_mass_masks(attention * 7, 0.6), attention_mass_masks(attention, 0.6))


def test_mass_rule_breaks_ties_towards_the_later_patch():
    # shares 2/8, 1/8, 2/8, 1/8, 2/8 at 0.5: two of the three tied 2/8 patches are needed; the
    # reference's ascending sort puts equal values in index order and keeps from the end: 2 and 4.
    attention = torch.tensor([2.0, 1.0, 2.0, 1.0, 2.0]) / 8
    assert attention_mass_masks(attention.view(1, 5), 0.5).nonzero()[:, 1].tolist() == [2, 4]


def test_mass_rule_works_per_head_on_maps():
    # two heads of 2 x 2 patches: head 0 shares 0.5, 0.25, 0.125, 0.125 -> at 0.7 the top two (0.75);
    # head 1 uniform -> 0.7 needs three of four, the last three in index order (ties).
    attention = torch.tensor([[[0.5, 0.125], [0.25, 0.125]], [[0.25, 0.25], [0.25, 0.25]]])
    masks = attention_mass_masks(attention, 0.7)
    assert masks.tolist() == [[[True, False], [True, False]], [[False, True], [True, True]]]


def test_jaccard_on_hand_drawn_masks():
    truth = np.zeros((4, 4), dtype=bool)
    truth[:2, :3] = True  # 6 pixels
    square = np.zeros((4, 4), dtype=bool)
    square[:2, :2] = True  # 4 pixels, all inside the truth
    shifted = np.zeros((4, 4), dtype=bool)
    shifted[2:, :] = True  # 8 pixels, none inside
    empty = np.zeros((4, 4), dtype=bool)
    scores = jaccard(np.stack([square, shifted, empty, truth]), truth)
    np.testing.assert_allclose(scores, [4 / 6, 0.0, 0.0, 1.0])
    assert jaccard(empty, empty) == 1.0  # nothing to find and nothing found
    assert jaccard(square, empty) == 0.0


def write_palette_png(path: Path, ids: np.ndarray) -> None:
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(davis_palette().flatten().tolist())
    image.save(path)


def test_voc_border_counts_as_neither_foreground_nor_background(tmp_path):
    # object 1 in the middle, its 255 border on the right and bottom; the mask covers the two right
    # columns. Valid pixels: 11. Mask on valid pixels: (0,2) (0,3) (1,2) (2,2); truth: (1,1) (1,2)
    # (2,1) (2,2); intersection (1,2) (2,2) = 2, union 6 -> 1/3. Counting 255 as background instead:
    # the mask has 8 pixels, intersection 2, union 10 -> 0.2.
    ids = np.array([[0, 0, 0, 0], [0, 1, 1, 255], [0, 1, 1, 255], [0, 255, 255, 255]])
    write_palette_png(tmp_path / "voc.png", ids)
    truth, valid = read_truth(tmp_path / "voc.png", "voc", size=4, patch_size=1)
    assert truth.sum() == 4 and valid.sum() == 11
    mask = np.zeros((4, 4), dtype=bool)
    mask[:, 2:] = True
    assert jaccard(mask, truth, valid) == pytest.approx(1 / 3)
    assert jaccard(mask, truth) == pytest.approx(0.2)
    # DAVIS: 0/255 masks, foreground = annotation > 0, every pixel valid
    Image.fromarray((ids == 1).astype(np.uint8) * 255).save(tmp_path / "davis.png")
    truth, valid = read_truth(tmp_path / "davis.png", "davis", size=4, patch_size=1)
    assert truth.sum() == 4 and valid.all()


def test_ground_truth_is_resized_by_nearest_and_cropped_with_the_image(tmp_path):
    ids = np.zeros((10, 20), dtype=np.uint8)
    ids[:, 10:] = 255  # right half
    Image.fromarray(ids).save(tmp_path / "mask.png")
    truth, valid = read_truth(tmp_path / "mask.png", "davis", size=9, patch_size=4)  # 9 x 9, then 8 x 8
    assert truth.shape == (8, 8) and valid.all()
    assert not truth[:, :4].any() and truth[:, 5:].all()


def test_centre_square_covers_the_area_fraction():
    square = centre_square(10, 10, 0.36)  # side 6, rows and columns 2..7
    assert square.sum() == 36 and square[2:8, 2:8].all()
    assert centre_square(10, 10, 0.0).sum() == 0 and centre_square(10, 10, 1.0).all()
    assert centre_square(4, 8, 1.0).sum() == 16  # at most the shorter side


# ----------------------------------------------------------------------------------------------
# The whole pipeline against the reference's own code
# ----------------------------------------------------------------------------------------------

def seeded_reference_state_dict(depth: int = 12, dim: int = 384, patch: int = 16, grid: int = 14,
                                seed: int = 0) -> dict[str, torch.Tensor]:
    """A ViT-S/16 state dict in the reference's `vision_transformer.py` naming, from a seeded
    recipe (not the reference's initialisation, which needs its code): every weight matrix normal
    with std 1/sqrt(fan-in), so that attention depends on the image; biases 0, layer norms 1/0,
    CLS token N(0, 1), position embeddings N(0, 0.02) as the reference's."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, std):
        return torch.randn(*shape, generator=generator) * std

    state = {"cls_token": normal(1, 1, dim, std=1.0), "pos_embed": normal(1, 1 + grid * grid, dim, std=0.02),
             "patch_embed.proj.weight": normal(dim, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
             "patch_embed.proj.bias": torch.zeros(dim)}
    for block in range(depth):
        prefix = f"blocks.{block}."
        for norm in ("norm1", "norm2"):
            state[prefix + norm + ".weight"], state[prefix + norm + ".bias"] = torch.ones(dim), torch.zeros(dim)
        for name, (rows, columns) in (("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                                      ("mlp.fc1", (4 * dim, dim)), ("mlp.fc2", (dim, 4 * dim))):
            state[prefix + name + ".weight"] = normal(rows, columns, std=columns ** -0.5)
            state[prefix + name + ".bias"] = torch.zeros(rows)
    state["norm.weight"], state["norm.bias"] = torch.ones(dim), torch.zeros(dim)
    return state


# The reference's scores on the shared DAVIS frames (blackswan, car-shadow), 480 x 480, threshold 0.6,
# for the weights above (seed 0), computed once with the reference's code and kept here as figures.
# Produced by a throwaway script (not in this repository), run with torch 2.14.1 + torchvision 0.29.1
# in a separate environment:
#     python reference_attention_jaccard.py --recipe_weights --seed 0 --checkpoint vits16.pth \
#         --davis ../shared/data/davis --sequences blackswan,car-shadow --max_frames N --image_size 480 --threshold 0.6
# It builds facebookresearch/dino's `vision_transformer.vit_small(patch_size=16, num_classes=0)`, loads
# this state dict (strict), and for the first N frames of each sequence: torchvision
# `Resize((480, 480))`, `ToTensor`, ImageNet `Normalize`, crop to a multiple of 16,
# `model.get_last_selfattention`, the [CLS] row per head (and its mean over heads), then the exact
# thresholding lines of the reference's `visualize_attention.py` (ascending sort, share, cumsum,
# `> 1 - threshold`, unsort, nearest upsampling by the patch size); the annotation is PIL-resized to
# 480 x 480 by nearest, foreground = value > 0; Jaccard per image (1 when both are empty), averaged.
REFERENCE_3_FRAMES = {  # --max_frames 3 (6 images)
    "per_head": [10.8850, 4.6662, 8.6963, 3.2833, 4.2206, 7.4064],
    "mean_head": 6.5263, "best_head": 10.8850, "best_head_index": 0, "averaged_attention": 8.0193,
}
REFERENCE_10_FRAMES = {  # --max_frames 10 (20 images)
    "per_head": [10.6327, 4.0953, 8.1087, 2.9006, 4.0763, 7.2300],
    "mean_head": 6.1739, "best_head": 10.6327, "best_head_index": 0, "averaged_attention": 7.4521,
}
# hf_dino gave the same figures to the fourth decimal on both settings. The reference's own random
# initialisation (`torch.manual_seed(0)` before `vit_small(patch_size=16)`, not reproducible without
# its code) gave, on the 10-frame setting: mean_head 9.5238, best_head 13.2322 (head 2),
# averaged_attention 9.9140 against hf_dino's 9.5282, 13.2384, 9.9193 on the converted checkpoint.


@pytest.fixture(scope="module")
def seeded_vit_s16(tmp_path_factory) -> Path:
    """The seeded state dict saved as a reference checkpoint and converted by the project's converter."""
    from hf_dino.commands.convert_dino_checkpoint import main as convert

    folder = tmp_path_factory.mktemp("seeded_vit_s16")
    torch.save(seeded_reference_state_dict(), folder / "vits16.pth")
    convert(["--checkpoint", str(folder / "vits16.pth"), "--output_dir", str(folder / "converted")])
    return folder / "converted"


def run_probe(model: Path, tmp_path: Path, *flags: str) -> dict:
    output = tmp_path / "scores.json"
    main(["--model", str(model), "--output_json", str(output), *flags])
    return json.loads(output.read_text())


def assert_matches_reference(result: dict, reference: dict, tolerance: float) -> None:
    """Scores within `tolerance` points (the issue asks 0.5). A single 16 px patch crossing the mass
    boundary through float rounding moves one image's Jaccard by about one point, the mean of
    6 images by ~0.2: the tolerances allow that, not a different rule."""
    np.testing.assert_allclose(result["per_head"], reference["per_head"], atol=tolerance)
    for key in ("mean_head", "best_head", "averaged_attention"):
        assert result[key] == pytest.approx(reference[key], abs=tolerance), key
    assert result["best_head_index"] == reference["best_head_index"]


@needs_davis
def test_pipeline_matches_the_reference_on_davis_frames(seeded_vit_s16, tmp_path):
    result = run_probe(seeded_vit_s16, tmp_path, "--data_path", str(DAVIS), "--sequences", "blackswan,car-shadow",
                       "--max_frames", "3", "--image_size", "480", "--threshold", "0.6",
                       "--save_overlays", str(tmp_path / "overlays"))
    assert result["dataset_layout"] == "davis"  # the default for a folder that looks like DAVIS
    assert result["images"] == 6 and result["num_heads"] == 6 and result["input_size"] == 480
    assert_matches_reference(result, REFERENCE_3_FRAMES, tolerance=0.3)
    overlays = sorted(p.relative_to(tmp_path / "overlays").as_posix() for p in (tmp_path / "overlays").rglob("*.png"))
    assert overlays == [f"{seq}/{i:05d}.png" for seq in ("blackswan", "car-shadow") for i in range(3)]
    assert Image.open(tmp_path / "overlays" / overlays[0]).size == (960, 480)  # image | mask, side by side
    assert 0 < result["centre_prior_area"] < 1 and 0 <= result["centre_prior"] <= 100
    assert set(result["per_sequence"]) == {"blackswan", "car-shadow"}


@needs_davis
@pytest.mark.slow
def test_pipeline_matches_the_reference_on_ten_frames_per_sequence(seeded_vit_s16, tmp_path):
    result = run_probe(seeded_vit_s16, tmp_path, "--data_path", str(DAVIS), "--dataset_layout", "davis",
                       "--sequences", "blackswan,car-shadow", "--max_frames", "10", "--image_size", "480",
                       "--threshold", "0.6", "--batch_size", "4", "--save_overlays", str(tmp_path / "overlays"))
    assert result["images"] == 20 and len(list((tmp_path / "overlays").rglob("*.png"))) == 20
    assert_matches_reference(result, REFERENCE_10_FRAMES, tolerance=0.2)
    # with the reference's position-embedding interpolation, the same maps to float precision: the
    # figures agree to the fourth decimal (0.1 leaves room for one patch flipped by rounding)
    quirk = run_probe(seeded_vit_s16, tmp_path, "--data_path", str(DAVIS), "--sequences", "blackswan,car-shadow",
                      "--max_frames", "10", "--reference_pos_interpolation")
    assert quirk["reference_pos_interpolation"] is True
    assert_matches_reference(quirk, REFERENCE_10_FRAMES, tolerance=0.1)


# ----------------------------------------------------------------------------------------------
# VOC layout, against a from-scratch computation
# ----------------------------------------------------------------------------------------------

def tiny_vit(folder: Path, patch_size: int = 8, seed: int = 0) -> Path:
    model = conftest.tiny_vit(seed, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=patch_size,
                              layer_norm_eps=1e-6)
    with torch.no_grad():  # peaky, image-dependent attention
        for layer in model.layers:
            layer.attention.q_proj.weight.normal_(0, 1.0)
            layer.attention.k_proj.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    return folder


def voc_folder(root: Path, count: int = 3) -> Path:
    """A PASCAL VOC layout from synthetic pictures: a bright disk (object 1) on noise, its 255 border."""
    rng = np.random.default_rng(0)
    for folder in ("JPEGImages", "SegmentationObject", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    names = []
    for index in range(count):
        height, width = 60 + 10 * index, 90
        rows, columns = np.ogrid[:height, :width]
        distance = np.hypot(rows - height / 2, columns - 30 - 10 * index)
        image = (rng.random((height, width, 3)) * 120).astype(np.uint8)
        image[distance < 15] = (250, 200, 40)
        ids = np.where(distance < 15, 1, 0)
        ids[(distance >= 15) & (distance < 18)] = 255
        names.append(f"2007_{index:06d}")
        Image.fromarray(image).save(root / "JPEGImages" / f"{names[-1]}.jpg", quality=95)
        write_palette_png(root / "SegmentationObject" / f"{names[-1]}.png", ids)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(names) + "\n")
    return root


def from_scratch_scores(model_dir: Path, root: Path, size: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per image: Jaccards of every head and of the head mean, from transformers' eager attention
    (every block's full matrix), a greedy descending mass rule and numpy counting."""
    from transformers import ViTModel

    model = ViTModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    patch = model.config.patch_size
    side = size // patch * patch
    heads_scores, mean_scores = [], []
    for name in (root / "ImageSets/Segmentation/val.txt").read_text().split():
        image = Image.open(root / "JPEGImages" / f"{name}.jpg").convert("RGB").resize((size, size), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32)[:side, :side] / 255
        pixels = (pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        tensor = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]
        with torch.no_grad():
            attentions = model(pixel_values=tensor, output_attentions=True, interpolate_pos_encoding=True).attentions
        cls = attentions[-1][0, :, 0, 1:].numpy().astype(np.float64)  # (heads, N)
        ids = np.asarray(Image.open(root / "SegmentationObject" / f"{name}.png").resize((size, size), Image.NEAREST))
        ids = ids[:side, :side]
        valid, truth = ids != 255, (ids > 0) & (ids != 255)

        def mask_of(values):
            order = np.argsort(-values, kind="stable")
            keep = np.zeros(values.size, dtype=bool)
            total = 0.0
            for index in order:
                keep[index] = True
                total += values[index]
                if total >= threshold * values.sum():
                    break
            grid = keep.reshape(side // patch, side // patch)
            return np.kron(grid, np.ones((patch, patch), dtype=bool)).astype(bool)

        def score(mask):
            union = ((mask | truth) & valid).sum()
            return 1.0 if union == 0 else ((mask & truth) & valid).sum() / union

        heads_scores.append([score(mask_of(values)) for values in cls])
        mean_scores.append(score(mask_of(cls.mean(0))))
    return 100 * np.array(heads_scores), 100 * np.array(mean_scores)


def test_voc_layout_matches_a_from_scratch_computation(tmp_path):
    model = tiny_vit(tmp_path / "vit")
    root = voc_folder(tmp_path / "voc")
    assert detect_layout(root) == "voc"
    result = run_probe(model, tmp_path, "--data_path", str(root), "--image_size", "64", "--threshold", "0.6",
                       "--batch_size", "2", "--save_overlays", str(tmp_path / "overlays"), "--random_init_baseline")
    heads, mean = from_scratch_scores(model, root, 64, 0.6)
    assert result["dataset_layout"] == "voc" and result["images"] == 3 and result["num_heads"] == 4
    np.testing.assert_allclose(result["per_head"], heads.mean(0), atol=1e-3)
    assert result["mean_head"] == pytest.approx(heads.mean(), abs=1e-3)
    assert result["best_head_index"] == int(heads.mean(0).argmax())
    assert result["best_head"] == pytest.approx(heads.mean(0).max(), abs=1e-3)
    assert result["averaged_attention"] == pytest.approx(mean.mean(), abs=1e-3)
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == [f"2007_{i:06d}.png" for i in range(3)]
    baseline = result["random_init"]
    assert baseline["seed"] == 0 and len(baseline["per_head"]) == 4 and "centre_prior" in baseline
    assert baseline["per_head"] != result["per_head"]  # another model: the same ViT, freshly initialised


@needs_davis
def test_davis_frames_are_the_first_annotated_ones_of_each_sequence():
    samples = davis_samples(DAVIS, ["car-shadow", "blackswan"], max_frames=2)
    assert [s.name for s in samples] == ["car-shadow/00000", "car-shadow/00001", "blackswan/00000", "blackswan/00001"]
    assert {s.name.split("/")[0] for s in davis_samples(DAVIS)} == {"blackswan", "car-shadow"}  # from val.txt


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2
# ----------------------------------------------------------------------------------------------

def expect_usage_error(capsys, argv: list[str], *fragments: str) -> None:
    capsys.readouterr()  # what came before (progress bars of save_pretrained)
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]  # after transformers' loading progress bars, if any
    assert error.startswith("error: ") and "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in error, error


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    from transformers import ResNetConfig, ResNetModel

    model = tiny_vit(tmp_path / "vit")
    root = voc_folder(tmp_path / "voc", count=1)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(tmp_path / "resnet")
    expect_usage_error(capsys, ["--model", str(tmp_path / "resnet"), "--data_path", str(root)], "--model", "ViT")
    expect_usage_error(capsys, ["--model", str(model), "--data_path", str(tmp_path / "nowhere")], "--data_path")
    expect_usage_error(capsys, ["--model", str(model), "--data_path", str(tmp_path)], "neither a DAVIS", "VOC")
    expect_usage_error(capsys, ["--model", str(model), "--data_path", str(root), "--threshold", "0"], "--threshold 0")
    expect_usage_error(capsys, ["--model", str(model), "--data_path", str(root), "--sequences", "a"], "--sequences")
    expect_usage_error(capsys, ["--model", str(model), "--data_path", str(root), "--image_size", "4"],
                       "--image_size 4", "patch size 8")
    expect_usage_error(capsys, ["--model", str(model), "--data_path", str(root), "--dataset_layout", "coco"],
                       "--dataset_layout")
    expect_usage_error(capsys, ["--model", str(model), "--data_path", str(root), "--image_set", "train"], "train.txt")
    expect_usage_error(capsys, ["--model", str(model), "--data_path", str(root), "--dataset_layout", "davis"],
                       "not a DAVIS root")
    (root / "SegmentationObject" / "2007_000000.png").unlink()
    expect_usage_error(capsys, ["--model", str(model), "--data_path", str(root)], "2007_000000.png", "missing")
    assert not (tmp_path / "scores.json").exists()


@needs_davis
def test_unknown_davis_sequence_is_a_usage_error(tmp_path, capsys):
    model = tiny_vit(tmp_path / "vit")
    expect_usage_error(capsys, ["--model", str(model), "--data_path", str(DAVIS), "--sequences", "no-such-seq"],
                       "no-such-seq")
