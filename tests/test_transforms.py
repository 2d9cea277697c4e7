import albumentations as A
import numpy as np
import pytest
import torch

from hf_dino.transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, evaluation_transform


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
