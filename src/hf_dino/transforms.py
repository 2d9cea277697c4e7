"""Multi-crop augmentation of DINO (BYOL colour augmentations) with albumentations.

Per image: 2 global crops (the second with solarisation) and N local crops, each
(3, size, size) float32 tensors normalised with the ImageNet statistics.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# How every hf_dino transform resizes: bicubic when enlarging, pixel-area averaging when shrinking.
# OpenCV's bicubic does not antialias, so a shrunk image aliases (a fine pattern turns into a coarse
# one); the reference's PIL bicubic widens its filter when shrinking. Area averaging is OpenCV's
# antialiased reduction: within ~2 grey levels of PIL's on natural images (tests/test_transforms.py).
RESIZE = {"interpolation": cv2.INTER_CUBIC, "area_for_downscale": "image"}


@dataclass(frozen=True)
class AugmentationParams:
    """The reference's augmentation probabilities and strengths (BYOL, Grill et al. 2020)."""

    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_prob_global_1: float = 1.0
    blur_prob_global_2: float = 0.1
    blur_prob_local: float = 0.5
    solarize_prob_global_2: float = 0.2
    solarize_threshold: float = 0.5  # fraction of the max pixel value (128 for uint8)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)


def _crop_pipeline(size: int, scale: Sequence[float], blur_prob: float, solarize_prob: float,
                   params: AugmentationParams) -> A.Compose:
    steps = [
        A.RandomResizedCrop(size=(size, size), scale=tuple(scale), ratio=params.crop_ratio, **RESIZE),
        A.HorizontalFlip(p=params.flip_prob),
        A.ColorJitter(brightness=params.brightness, contrast=params.contrast,
                      saturation=params.saturation, hue=params.hue, p=params.color_jitter_prob),
        A.ToGray(num_output_channels=3, p=params.grayscale_prob),
    ]
    if blur_prob > 0:
        steps.append(A.GaussianBlur(blur_limit=0, sigma_limit=params.blur_sigma, p=blur_prob))
    if solarize_prob > 0:
        threshold = params.solarize_threshold
        steps.append(A.Solarize(threshold_range=(threshold, threshold), p=solarize_prob))
    steps += [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps)


class MultiCropAugmentation:
    """Callable: uint8 RGB image (H, W, 3) -> list of 2 + `local_crops_number` tensors.

    Args:
        global_crop_size / local_crop_size: output side in pixels (224 / 96 in the paper).
        global_crops_scale / local_crops_scale: area fraction ranges of the random-resized crops.
        local_crops_number: N local crops (0 disables them).
        params: probabilities and strengths (the paper's by default).

    Given `seed`, the crops depend only on it (each view's pipeline is reseeded from it), so a
    sample's crops can be made a function of (run seed, epoch, sample index).
    """

    def __init__(self, global_crop_size: int = 224, local_crop_size: int = 96,
                 global_crops_scale: Sequence[float] = (0.4, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.4), local_crops_number: int = 8,
                 params: AugmentationParams = AugmentationParams()):
        self.local_crops_number = local_crops_number
        self.global_1 = _crop_pipeline(global_crop_size, global_crops_scale, params.blur_prob_global_1, 0.0, params)
        self.global_2 = _crop_pipeline(global_crop_size, global_crops_scale, params.blur_prob_global_2,
                                       params.solarize_prob_global_2, params)
        self.local = _crop_pipeline(local_crop_size, local_crops_scale, params.blur_prob_local, 0.0, params)

    def __call__(self, image: np.ndarray, seed: int | None = None) -> list[torch.Tensor]:
        if seed is not None:
            # One numpy and one Python stream per sample, drawn from in turn by every transform of every
            # view. (`Compose.set_random_seed` seeds each transform's own generators with the same value,
            # so the transforms' draws coincide: every flipped crop was colour-jittered, every grey one
            # flipped and solarised, and small crops went with flips. It also cost ~45% of the augmentation time.)
            random_generator, py_random = np.random.default_rng(seed), random.Random(seed)
            for pipeline in (self.global_1, self.global_2, self.local):
                pipeline.set_random_state(random_generator, py_random)
        crops = [self.global_1(image=image)["image"], self.global_2(image=image)["image"]]
        crops += [self.local(image=image)["image"] for _ in range(self.local_crops_number)]
        return crops


def evaluation_transform(crop_size: int, resize_ratio: float = 256 / 224) -> A.Compose:
    """Resize the shorter side to crop_size * resize_ratio, centre-crop, normalise.

    The reference's evaluation (Resize 256, CenterCrop 224) scaled to any input size.
    Returns (3, crop_size, crop_size) float tensors under the "image" key.
    """
    resize_size = max(crop_size, round(crop_size * resize_ratio))
    return A.Compose([
        A.SmallestMaxSize(max_size=resize_size, **RESIZE),
        A.CenterCrop(height=crop_size, width=crop_size),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0),
        ToTensorV2(),
    ])


def _centre_square_transform(size: int) -> A.Compose:
    return A.Compose([A.SmallestMaxSize(max_size=size, **RESIZE), A.CenterCrop(height=size, width=size)])


def centre_square(image: np.ndarray, size: int) -> np.ndarray:
    """What a model evaluated at `size` sees, as an image: (H, W, 3) uint8 -> (size, size, 3) uint8,
    the shorter side resized to `size` and the centre square cropped (for overlays)."""
    return _centre_square_transform(size)(image=image)["image"]


def centre_square_with_mask(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`centre_square` of an image and of its (H, W) integer label mask alike: -> (size, size, 3)
    uint8 and (size, size) labels, the mask resized by nearest neighbour (labels stay labels)."""
    square = _centre_square_transform(size)(image=image, mask=mask)
    return square["image"], square["mask"]


def linear_probe_train_transform(crop_size: int, scale: tuple[float, float] = (0.08, 1.0)) -> A.Compose:
    """The reference linear-evaluation training augmentation: random-resized crop (bicubic) and
    horizontal flip, then normalisation. Returns (3, crop_size, crop_size) under "image"."""
    return A.Compose([
        A.RandomResizedCrop(size=(crop_size, crop_size), scale=scale, **RESIZE),
        A.HorizontalFlip(p=0.5),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0),
        ToTensorV2(),
    ])
