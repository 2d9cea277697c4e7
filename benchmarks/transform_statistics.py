#!/usr/bin/env python
"""hf_dino's multi-crop augmentation (albumentations) against a torchvision pipeline built from
the paper's description of the reference's (PIL, torchvision), on the same photographs.

Compared, each as two samples with the two-sample Kolmogorov-Smirnov statistic (0 = the same
distribution; with n samples per side, values under ~1.36 * sqrt(2 / n) are what chance gives):
  - crop geometry of the random-resized crops: area fraction and aspect ratio (w / h), from each
    library's own parameter sampler;
  - colour statistics of the finished crops (after flips, colour jitter, grayscale, blur,
    solarisation and normalisation): per-crop mean and standard deviation of each channel, for
    the first global crop, the second (solarised) and a local crop.

Needs torchvision beside hf_dino, which torch 2.13.0+cpu cannot import: run it in an environment
with torch 2.14.1 + torchvision 0.29.1 (`pip install torch==2.14.1 torchvision==0.29.1 -e .`).

    python benchmarks/transform_statistics.py --images ../shared/data/davis/JPEGImages/480p \\
        --crops_per_image 40 --output_json transform_statistics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def torchvision_pipelines(global_size: int, local_size: int, global_scale, local_scale):
    """The reference's augmentation as the paper and its appendix describe it, in torchvision:
    random-resized crop (bicubic), flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
    grayscale 0.2, Gaussian blur sigma 0.1-2 (p 1.0 / 0.1 / 0.5), solarisation 0.2 (second global)."""
    from torchvision import transforms as T

    def blur(p):
        # kernel 23 at 224 px as the reference's PIL filter has no kernel size; sigma is what matters
        return T.RandomApply([T.GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))], p=p)

    colour = [T.RandomHorizontalFlip(p=0.5),
              T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
              T.RandomGrayscale(p=0.2)]
    normalise = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    bicubic = T.InterpolationMode.BICUBIC
    return {
        "global_1": T.Compose([T.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
                               *colour, blur(1.0), *normalise]),
        "global_2": T.Compose([T.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
                               *colour, blur(0.1), T.RandomSolarize(128, p=0.2), *normalise]),
        "local": T.Compose([T.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic),
                            *colour, blur(0.5), *normalise]),
    }


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b).statistic)


def crop_geometry(images: list[np.ndarray], draws: int, scale, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """{"hf_dino" | "torchvision": {"area": (n,), "aspect": (n,)}} of `draws` crops per image."""
    import albumentations as A
    from torchvision import transforms as T

    ours = A.RandomResizedCrop(size=(224, 224), scale=scale, ratio=(3 / 4, 4 / 3))
    ours.set_random_seed(seed)
    torch.manual_seed(seed)
    samples = {name: {"area": [], "aspect": []} for name in ("hf_dino", "torchvision")}
    for image in images:
        height, width = image.shape[:2]
        pil = Image.fromarray(image)
        for _ in range(draws):
            x_min, y_min, x_max, y_max = ours.get_params_dependent_on_data({"shape": image.shape}, {"image": image})["crop_coords"]
            samples["hf_dino"]["area"].append((x_max - x_min) * (y_max - y_min) / (height * width))
            samples["hf_dino"]["aspect"].append((x_max - x_min) / (y_max - y_min))
            _, _, crop_height, crop_width = T.RandomResizedCrop.get_params(pil, scale=list(scale), ratio=[3 / 4, 4 / 3])
            samples["torchvision"]["area"].append(crop_height * crop_width / (height * width))
            samples["torchvision"]["aspect"].append(crop_width / crop_height)
    return {name: {k: np.asarray(v) for k, v in values.items()} for name, values in samples.items()}


def colour_statistics(images: list[np.ndarray], draws: int, seed: int, global_size: int, local_size: int,
                      global_scale, local_scale) -> dict[str, dict[str, np.ndarray]]:
    """{"<view>/<implementation>": (n, 6) per-crop channel means and standard deviations}."""
    from hf_dino.transforms import MultiCropAugmentation

    ours = MultiCropAugmentation(global_crop_size=global_size, local_crop_size=local_size,
                                 global_crops_scale=global_scale, local_crops_scale=local_scale, local_crops_number=1)
    theirs = torchvision_pipelines(global_size, local_size, global_scale, local_scale)
    torch.manual_seed(seed)
    rows: dict[str, list] = {}
    for index, image in enumerate(images):
        pil = Image.fromarray(image)
        for draw in range(draws):
            crops = ours(image, seed=seed * 1_000_003 + index * 1009 + draw)
            for view, crop in zip(("global_1", "global_2", "local"), crops):
                rows.setdefault(f"{view}/hf_dino", []).append(summary(crop))
            for view, pipeline in theirs.items():
                rows.setdefault(f"{view}/torchvision", []).append(summary(pipeline(pil)))
    return {key: np.stack(value) for key, value in rows.items()}


def summary(crop: torch.Tensor) -> np.ndarray:
    """(3, H, W) -> (6,) channel means, then channel standard deviations."""
    flat = crop.float().flatten(1)
    return torch.cat([flat.mean(1), flat.std(1)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of photographs (searched recursively)")
    parser.add_argument("--max_images", type=int, default=60)
    parser.add_argument("--crops_per_image", type=int, default=40, help="crop-geometry draws per image")
    parser.add_argument("--colour_draws", type=int, default=4, help="augmented crops per image and view")
    parser.add_argument("--global_size", type=int, default=224)
    parser.add_argument("--local_size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", type=Path)
    args = parser.parse_args()

    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    step = max(1, len(paths) // args.max_images)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[::step][:args.max_images]]
    print(f"{len(images)} images from {args.images}")
    report: dict = {"images": len(images), "geometry": {}, "colour": {}}
    for name, scale in (("global", (0.4, 1.0)), ("local", (0.05, 0.4))):
        geometry = crop_geometry(images, args.crops_per_image, scale, args.seed)
        for quantity in ("area", "aspect"):
            ours, theirs = geometry["hf_dino"][quantity], geometry["torchvision"][quantity]
            report["geometry"][f"{name}/{quantity}"] = {
                "hf_dino_mean": float(ours.mean()), "torchvision_mean": float(theirs.mean()),
                "hf_dino_quartiles": np.quantile(ours, [0.25, 0.5, 0.75]).round(4).tolist(),
                "torchvision_quartiles": np.quantile(theirs, [0.25, 0.5, 0.75]).round(4).tolist(),
                "ks": ks_statistic(ours, theirs), "n": len(ours)}
    colour = colour_statistics(images, args.colour_draws, args.seed, args.global_size, args.local_size,
                               (0.4, 1.0), (0.05, 0.4))
    names = ["mean_R", "mean_G", "mean_B", "std_R", "std_G", "std_B"]
    for view in ("global_1", "global_2", "local"):
        ours, theirs = colour[f"{view}/hf_dino"], colour[f"{view}/torchvision"]
        report["colour"][view] = {name: {"hf_dino_mean": float(ours[:, i].mean()), "torchvision_mean": float(theirs[:, i].mean()),
                                         "ks": ks_statistic(ours[:, i], theirs[:, i])}
                                  for i, name in enumerate(names)} | {"n": len(ours)}
    print(json.dumps(report, indent=2))
    if args.output_json:
        args.output_json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
