import albumentations as A
import numpy as np
import pytest
import torch

from hf_dino.transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentationParams, MultiCropAugmentation, evaluation_transform


def photo(seed=0, size=48):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)


def steps(compose):
    return {type(t).__name__: t for t in compose.transforms}


def test_crop_count_and_shapes():
    augmentation = MultiCropAugmentation(32, 16, local_crops_number=5)
    crops = augmentation(photo())
    assert len(crops) == 7
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 5
    assert all(c.dtype == torch.float32 for c in crops)


def test_pipelines_follow_the_reference_recipe():
    augmentation = MultiCropAugmentation(224, 96, (0.4, 1.0), (0.05, 0.4), 8)
    global_1, global_2, local = map(steps, (augmentation.global_1, augmentation.global_2, augmentation.local))
    assert global_1["RandomResizedCrop"].scale == (0.4, 1.0) and local["RandomResizedCrop"].scale == (0.05, 0.4)
    assert global_1["RandomResizedCrop"].interpolation == 2  # cv2.INTER_CUBIC (bicubic, as the reference)
    assert global_1["GaussianBlur"].p == 1.0 and global_2["GaussianBlur"].p == 0.1 and local["GaussianBlur"].p == 0.5
    assert global_1["GaussianBlur"].sigma_limit == (0.1, 2.0)
    assert "Solarize" not in global_1 and "Solarize" not in local and global_2["Solarize"].p == 0.2
    for pipeline in (global_1, global_2, local):
        assert pipeline["HorizontalFlip"].p == 0.5 and pipeline["ToGray"].p == 0.2
        jitter = pipeline["ColorJitter"]
        assert jitter.p == 0.8
        assert tuple(jitter.brightness) == pytest.approx((0.6, 1.4)) and tuple(jitter.contrast) == pytest.approx((0.6, 1.4))
        assert tuple(jitter.saturation) == pytest.approx((0.8, 1.2)) and tuple(jitter.hue) == pytest.approx((-0.1, 0.1))


def test_seeded_crops_are_reproducible_and_seed_dependent():
    augmentation = MultiCropAugmentation(32, 16, local_crops_number=2)
    first, again, other = augmentation(photo(), seed=7), augmentation(photo(), seed=7), augmentation(photo(), seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    fresh = MultiCropAugmentation(32, 16, local_crops_number=2)(photo(), seed=7)  # a new instance (another worker)
    assert all(torch.equal(a, b) for a, b in zip(first, fresh))


def test_seeded_random_decisions_are_independent():
    """Per-sample seeding must not tie one transform's coin to another's: P(flip | grey) = P(flip) = 0.5.
    (Seeding every transform with the same value made every grey crop a flipped one.)
    Image: red left half, blue right half. A crop of >= 60% of the area spans both halves, so its first
    column comes from the red half unless flipped; in a grey crop red is the brighter (luma 0.299 vs 0.114)."""
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, :16, 0] = 255
    image[:, 16:, 2] = 255
    augmentation = MultiCropAugmentation(32, 16, global_crops_scale=(0.6, 1.0), local_crops_number=0,
                                         params=AugmentationParams(blur_prob_global_1=0.0))
    std, mean = torch.tensor(IMAGENET_STD)[:, None, None], torch.tensor(IMAGENET_MEAN)[:, None, None]
    grey, grey_flipped, colour_flipped = 0, 0, 0
    num_samples = 600
    for seed in range(num_samples):
        crop = augmentation(image, seed=seed)[0] * std + mean  # (3, 32, 32) in [0, 1]
        first, last = crop[:, :, 0].mean(dim=1), crop[:, :, -1].mean(dim=1)  # (3,) colour of each edge column
        if (crop.max(dim=0).values - crop.min(dim=0).values).max() < 1e-3:
            grey += 1
            grey_flipped += int(first.mean() < last.mean())
        else:
            colour_flipped += int(first[2] > first[0])
    # P(grey) = 0.2 (120 expected, binomial sd 9.8); P(flip) = 0.5 in both groups (sd <= 4.6 points).
    assert 80 <= grey <= 160
    assert 0.35 <= grey_flipped / grey <= 0.65
    assert 0.43 <= colour_flipped / (num_samples - grey) <= 0.57


def test_imagenet_normalisation():
    gray = np.full((40, 40, 3), 128, dtype=np.uint8)
    pixel_values = evaluation_transform(32)(image=gray)["image"]
    expected = (128 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(pixel_values[:, 5, 5].numpy(), expected, rtol=1e-5)


def test_evaluation_transform_resizes_then_centre_crops():
    transform = evaluation_transform(224)
    assert steps(transform)["SmallestMaxSize"].max_size == 256
    assert transform(image=photo(size=300))["image"].shape == (3, 224, 224)
    assert isinstance(transform, A.Compose)


# ---------------------------------------------------------------------------- antialiased shrinking
def unnormalise(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) float grey levels 0-255."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((tensor * std + mean) * 255).permute(1, 2, 0).numpy()


def checkerboard(size: int = 64) -> np.ndarray:
    """A 1-pixel 0/255 checkerboard: shrunk without aliasing it is uniform grey, 127.5."""
    return np.repeat((np.indices((size, size)).sum(0) % 2 * 255).astype(np.uint8)[..., None], 3, axis=-1)


@pytest.mark.parametrize("side", [13, 20, 40])
def test_shrinking_does_not_alias_a_fine_pattern(side):
    """PIL's bicubic (the reference's resize) gives 127.5 +- 5 here; OpenCV's plain bicubic
    113-126 grey levels off (a coarse false pattern)."""
    whole = evaluation_transform(side, resize_ratio=1.0)(image=checkerboard())["image"]
    crops = MultiCropAugmentation(global_crop_size=side, global_crops_scale=(1.0, 1.0), local_crops_number=0,
                                  params=AugmentationParams(flip_prob=0, color_jitter_prob=0, grayscale_prob=0,
                                                            blur_prob_global_1=0, blur_prob_global_2=0,
                                                            solarize_prob_global_2=0, crop_ratio=(1.0, 1.0)))
    crop = crops(checkerboard(), seed=0)[0]
    for resized in (whole, crop):
        assert resized.shape == (3, side, side)
        assert np.abs(unnormalise(resized) - 127.5).max() <= 8.0


def test_resizing_follows_pils_bicubic_on_a_natural_image():
    """Shrunk 256 -> 52..160 px and enlarged 256 -> 320 px, a smooth random image lies within 2.5
    grey levels (mean absolute difference) of PIL's bicubic resize of it."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), (0, 0), 1.0)
    for side in (52, 80, 120, 160, 320):
        ours = unnormalise(evaluation_transform(side, resize_ratio=1.0)(image=image)["image"])
        pil = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC)).astype(np.float64)
        assert np.abs(ours - pil).mean() <= 2.5, side


def test_centre_square_with_mask_crops_the_mask_with_the_image():
    """20 x 30 -> 8 px: the shorter side becomes 8 (8 x 12), then columns 2..9 are kept. The
    mask's labels survive (nearest): a block at rows 5..14, columns 10..19 of the original lands
    on rows 2..5, columns 2..5 of the square (every coordinate x 0.4, minus the 2 cropped columns)."""
    import numpy as np

    from hf_dino.transforms import centre_square, centre_square_with_mask

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    labels = np.zeros((20, 30), np.uint8)
    labels[5:15, 10:20] = 7
    square, square_labels = centre_square_with_mask(image, labels, 8)
    expected = np.zeros((8, 8), np.uint8)
    expected[2:6, 2:6] = 7
    np.testing.assert_array_equal(square_labels, expected)
    np.testing.assert_array_equal(square, centre_square(image, 8))
