"""The interactive demo: a Gradio page that shows what a DINO ViT sees in an image.

Upload an image (or pick a bundled example) and the page shows the last block's CLS attention,
mean over heads and every head overlaid on the image, the patches holding `threshold` of the
mean attention's mass (the paper's mask), and the image's nearest neighbours among a gallery
(the embedded CIFAR-10 demo sample by default) by cosine similarity of the DINO feature (the
CLS token after the final norm) with the scores. Given the image's ground-truth mask as well, it
scores the masks against it by Jaccard, as `hf-dino-eval-attention-segmentation` does over a dataset.

`DinoDemo` does the work and is usable without Gradio (`DinoDemo.analyze`); `build_app` wraps it
in a `gr.Blocks` page whose `analyze` endpoint is also an API (`gradio_client`). The gallery's
features are computed once per (model, gallery, image size) and cached as safetensors. Bad input
(not an image, a huge image, a model that does not load) never stops the server: the page shows
a message saying what to do instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import DEMO_DATASET_DIR, FALLBACK_VAL_SPLITS, decode_image, load_dataset_dict, prepare_image_column
from ..evaluation.attention_segmentation import TRUTH_COLOUR, foreground_and_valid, jaccard, outline
from ..evaluation.features import backbone_cls_features, load_frozen_backbone
from ..transforms import centre_square, centre_square_with_mask, evaluation_transform
from ..visualization.attention import attention_mass_masks, cls_attention_and_feature, upsample_to_image, vit_backbone

logger = logging.getLogger(__name__)

# What `accelerate launch scripts/pretrain.py` writes (relative to the working directory).
DEFAULT_MODEL_DIR = Path("outputs") / "demo_cifar10_cpu" / "teacher_backbone"
EXAMPLES_DIR = Path(__file__).parent / "app_examples"
DEFAULT_CACHE_DIR = Path(os.environ.get("HF_DINO_CACHE", Path.home() / ".cache" / "hf_dino")) / "app_gallery"
# Images above this many pixels are refused before decoding (a 40 MP RGB image is 120 MB decoded).
MAX_IMAGE_PIXELS = 40_000_000
# Gallery and query images: shorter side resized to the model's size, centre square (whole image).
GALLERY_RESIZE_RATIO = 1.0
# Attention overlays are drawn at least this many pixels wide.
MIN_DISPLAY_SIZE = 224
# The attention input is capped by its number of patches, whatever the patch size: 4,096 (a 64 x 64
# grid: 512 px at patch 8, 1,024 px at patch 16). The largest request then stays near 0.85 GB of RSS
# for a ViT-S/8 (one block's activations; the last block computes only the CLS row of its attention).
MAX_ATTENTION_TOKENS = 4096
# Gradio's cache of uploads and rendered outputs: every 15 minutes, files older than an hour go.
DELETE_CACHE = (900, 3600)
NO_MODEL_MESSAGE = (
    "**No model loaded.** Train the demo model with `accelerate launch scripts/pretrain.py` (about 8 minutes "
    f"on a 2-core CPU; it writes `{DEFAULT_MODEL_DIR.as_posix()}`, which this app then opens by default), or "
    "type a backbone folder or a Hub id (e.g. `facebook/dino-vits16`) in the *Model* box.")


class AppInputError(ValueError):
    """Bad input the page reports as a message (the server keeps running)."""


def default_model() -> str | None:
    """The demo run's teacher backbone when `accelerate launch scripts/pretrain.py` has written it."""
    return str(DEFAULT_MODEL_DIR) if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


@dataclass
class LoadedModel:
    """A frozen ViT backbone (or `DinoModel`) and the sizes the demo needs."""

    name: str
    model: nn.Module
    patch_size: int
    image_size: int  # native (training) size: the neighbour search runs at it
    num_heads: int
    identity: str  # changes when the weights change: part of the gallery cache key


def load_model(name_or_path: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a ViT backbone folder, `DinoModel` folder or Hub id; AppInputError with a readable reason."""
    name_or_path = (name_or_path or "").strip()
    if not name_or_path:
        raise AppInputError(NO_MODEL_MESSAGE)
    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or local.exists()
    if looks_local and not local.is_dir():
        raise AppInputError(f"Model `{name_or_path}`: no such folder. Give a folder written by `save_pretrained` "
                            "(e.g. `outputs/demo_cifar10_cpu/teacher_backbone`) or a Hub id.")
    try:
        model, image_size = load_frozen_backbone(str(local) if looks_local else name_or_path, device)
        backbone = vit_backbone(model)
    except Exception as error:  # OSError (not found / offline), ValueError (not a ViT), ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AppInputError(f"Model `{name_or_path}` could not be loaded: {reason}") from error
    return LoadedModel(name=name_or_path, model=model, patch_size=int(backbone.config.patch_size),
                       image_size=image_size, num_heads=int(backbone.config.num_attention_heads),
                       identity=_model_identity(name_or_path, local if looks_local else None))


def _model_identity(name: str, folder: Path | None) -> str:
    if folder is None:
        return name
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    return json.dumps([str(folder.resolve()), stats])


@dataclass
class GalleryData:
    """The images neighbours are searched among: a 🤗 dataset split with undecoded image cells."""

    name: str
    dataset: object  # datasets.Dataset, image column not decoded
    image_column: str
    label_names: list[str] | None
    label_column: str | None

    def image(self, row: int) -> np.ndarray:
        return decode_image(self.dataset[row][self.image_column])

    def label(self, row: int) -> str | None:
        if self.label_column is None:
            return None
        value = self.dataset[row][self.label_column]
        return self.label_names[value] if self.label_names and isinstance(value, int) else str(value)


def load_gallery(gallery: str | None = None, split: str | None = None, max_images: int | None = None,
                 image_column: str = "image", label_column: str = "label") -> GalleryData:
    """A gallery dataset: `gallery` is anything `--dataset_name` takes (None: the embedded demo
    sample). Split: `split`, else the first of validation/test/val/valid/train present."""
    import datasets

    dataset_dict = load_dataset_dict(gallery)
    candidates = (split,) if split else (*FALLBACK_VAL_SPLITS, "train")
    chosen = next((name for name in candidates if name in dataset_dict), None)
    if chosen is None:
        raise KeyError(f"Gallery {gallery or DEMO_DATASET_DIR}: split {split!r} not found "
                       f"(available: {', '.join(dataset_dict)}).")
    dataset = prepare_image_column(dataset_dict[chosen], image_column)
    if max_images is not None and max_images < len(dataset):
        dataset = dataset.select(range(max_images))
    features = dataset.features or {}
    label_feature = features.get(label_column)
    label_names = getattr(label_feature, "names", None) if isinstance(label_feature, datasets.ClassLabel) else None
    name = f"{gallery or 'hf_dino demo CIFAR-10 sample'} [{chosen}]"
    return GalleryData(name=name, dataset=dataset, image_column=image_column, label_names=label_names,
                       label_column=label_column if label_column in features else None)


@torch.no_grad()
def compute_gallery_features(loaded: LoadedModel, gallery: GalleryData, batch_size: int = 64
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised DINO features (N, D) float32 of the decodable gallery images and their rows (N,)."""
    transform = evaluation_transform(loaded.image_size, resize_ratio=GALLERY_RESIZE_RATIO)
    features, rows, batch, batch_rows = [], [], [], []

    def flush():
        pixels = torch.stack(batch).to(next(loaded.model.parameters()).device)
        features.append(nn.functional.normalize(backbone_cls_features(loaded.model, pixels).float(), dim=-1).cpu())
        rows.extend(batch_rows)
        batch.clear()
        batch_rows.clear()

    for row in range(len(gallery.dataset)):
        image = decode_image(gallery.dataset[row][gallery.image_column])
        if image is None:
            continue
        batch.append(transform(image=image)["image"])
        batch_rows.append(row)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not features:
        raise ValueError(f"Gallery {gallery.name}: no decodable image.")
    return torch.cat(features), torch.tensor(rows, dtype=torch.long)


def gallery_cache_path(cache_dir: str | Path, loaded: LoadedModel, gallery: GalleryData) -> Path:
    """`cache_dir/<sha256 of model identity, image size, gallery name and fingerprint>.safetensors`."""
    fingerprint = getattr(gallery.dataset, "_fingerprint", None) or str(len(gallery.dataset))
    key = json.dumps([loaded.identity, loaded.image_size, GALLERY_RESIZE_RATIO, gallery.name, fingerprint,
                      len(gallery.dataset)])
    return Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def cached_gallery_features(loaded: LoadedModel, gallery: GalleryData, cache_dir: str | Path | None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery features from the cache, else computed once and written there (None: no cache)."""
    from safetensors.torch import load_file, save_file

    path = gallery_cache_path(cache_dir, loaded, gallery) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            tensors = load_file(path)
            return tensors["features"], tensors["rows"]
        except Exception as error:  # a truncated file from a killed run: recompute it
            logger.warning("Ignoring unreadable gallery cache %s: %s", path, error)
    start = time.perf_counter()
    features, rows = compute_gallery_features(loaded, gallery)
    logger.info("Gallery features %s of %s in %.1f s", tuple(features.shape), gallery.name,
                time.perf_counter() - start)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"features": features.contiguous(), "rows": rows}, partial,
                  metadata={"model": loaded.name, "gallery": gallery.name, "image_size": str(loaded.image_size)})
        partial.replace(path)
    return features, rows


def _image_header(path: str | Path, max_pixels: int) -> tuple[int, int, str]:
    """(width, height, mode) of an uploaded file, read from its header; AppInputError if it is not
    an image or has more than `max_pixels` pixels."""
    from PIL import Image

    name = Path(path).name
    try:
        with Image.open(path) as header:
            width, height, mode = *header.size, header.mode
    except Image.DecompressionBombError:
        raise AppInputError(f"`{name}` is far too large to decode safely; downscale it first.") from None
    except Exception:
        raise AppInputError(f"`{name}` is not an image file this app can read (PNG, JPEG, WebP, BMP, GIF, TIFF...)."
                            ) from None
    if width * height > max_pixels:
        raise AppInputError(f"`{name}` is {width}x{height} px ({width * height / 1e6:.0f} MP): the app takes up to "
                            f"{max_pixels / 1e6:.0f} MP. Downscale it (the model sees a few hundred pixels anyway).")
    return width, height, mode


def read_image(path: str | Path | None, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, str]:
    """An uploaded file -> (H, W, 3) uint8 RGB and a note on any conversion; AppInputError if unusable."""
    if path is None or not str(path):
        raise AppInputError("Upload an image (or click one of the examples) first.")
    name = Path(path).name
    _, _, mode = _image_header(path, max_pixels)
    image = decode_image(path)
    if image is None:
        raise AppInputError(f"`{name}` could not be decoded (truncated or corrupt file?).")
    note = "" if mode == "RGB" else f"converted from {mode} to RGB" + (" on white" if "A" in mode else "")
    return image, note


def read_ground_truth(path: str | Path, image_shape: tuple[int, int], max_pixels: int = MAX_IMAGE_PIXELS
                      ) -> tuple[np.ndarray, str]:
    """An uploaded ground-truth mask of an (H, W) image -> ((H, W) uint8 values, the layout whose
    rule reads them: `foreground_and_valid`). A palette PNG (DAVIS-2017, VOC's SegmentationObject
    or SegmentationClass) is read as VOC: its indices, 0 background, 255 ignored (VOC's object
    borders), any other foreground. Any other image (DAVIS-2016's 0/255 masks, a drawing) is read
    as DAVIS: each pixel's largest channel, non-zero = foreground. AppInputError when unreadable or
    not the image's size."""
    from PIL import Image

    name = Path(path).name
    width, height, mode = _image_header(path, max_pixels)
    if (height, width) != tuple(image_shape):
        raise AppInputError(f"Ground-truth mask `{name}` is {width}x{height} px but the image is {image_shape[1]}x"
                            f"{image_shape[0]}: upload the mask drawn for this image, at its size.")
    try:
        with Image.open(path) as annotation:
            values = np.asarray(annotation if mode == "P" else annotation.convert("RGB"))
    except Exception:
        raise AppInputError(f"Ground-truth mask `{name}` could not be decoded (truncated or corrupt file?).") from None
    return (values, "voc") if mode == "P" else (values.max(axis=-1), "davis")


def ground_truth_jaccard(head_masks: torch.Tensor, mean_mask: torch.Tensor, foreground: np.ndarray,
                         valid: np.ndarray, patch_size: int) -> dict:
    """Jaccard (percent) of the attention masks with a ground truth, counted over valid pixels:
    head_masks (heads, h, w) bool, mean_mask (h, w) bool, foreground and valid (h * patch_size,
    w * patch_size) bool -> {"per_head": [heads], "best_head": {"index", "jaccard"},
    "averaged_attention"}. Invalid pixels count as neither; a mask and truth both empty score 100."""
    per_head = 100 * jaccard(upsample_to_image(head_masks, patch_size).numpy(), foreground, valid)
    averaged = 100 * jaccard(upsample_to_image(mean_mask, patch_size).numpy(), foreground, valid)
    best = int(np.argmax(per_head))
    return {"per_head": [round(float(score), 2) for score in per_head],
            "best_head": {"index": best, "jaccard": round(float(per_head[best]), 2)},
            "averaged_attention": round(float(averaged), 2)}


def _resize(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    import cv2

    return cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_CUBIC)


def model_input(image: np.ndarray, size: int, loaded: LoadedModel) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, size, size) normalised pixels of the centre square, on the model's device."""
    pixels = evaluation_transform(size, resize_ratio=GALLERY_RESIZE_RATIO)(image=image)["image"][None]
    return pixels.to(next(loaded.model.parameters()).device)


def max_attention_size(patch_size: int, max_tokens: int = MAX_ATTENTION_TOKENS) -> int:
    """The largest square attention input (px) with at most `max_tokens` patches of `patch_size`."""
    return math.isqrt(max_tokens) * patch_size


def attention_and_feature(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the last block's CLS attention (B, heads, h, w) and the DINO feature
    (B, D), the final-norm CLS token of the same pass (`cls_attention_and_feature`: SDPA below the
    last block, only the CLS row of the last block's attention)."""
    return cls_attention_and_feature(model, pixel_values)


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """image (S, S, 3) uint8, heat (h, w) >= 0 -> (S, S, 3) uint8: inferno colours of the
    min-max-normalised map (nearest-upsampled, one block per patch) blended over the image."""
    from matplotlib import colormaps

    span = heat.max() - heat.min()
    normalised = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    coloured = (colormaps["inferno"](normalised)[..., :3] * 255).astype(np.uint8)
    coloured = _resize(coloured, image.shape[0], nearest=True)
    return (image * (1 - alpha) + coloured * alpha).round().astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, foreground: np.ndarray | None = None) -> np.ndarray:
    """image (S, S, 3) uint8, mask (h, w) bool -> the image with the unkept patches dimmed to 20%;
    given a ground truth's foreground ((s, s) bool), with its outline in yellow."""
    keep = _resize(mask.astype(np.uint8), image.shape[0], nearest=True).astype(bool)
    shown = np.where(keep[..., None], image, (image * 0.2).astype(np.uint8))
    if foreground is not None:
        foreground = _resize(foreground.astype(np.uint8), image.shape[0], nearest=True).astype(bool)
        shown[outline(foreground, width=max(2, image.shape[0] // 160))] = TRUTH_COLOUR
    return shown


@dataclass
class Analysis:
    """Everything the page shows for one image. Images are (S, S, 3) uint8."""

    attention: torch.Tensor  # (heads, h, w) last-block CLS-to-patch attention
    mask: torch.Tensor  # (h, w) bool, the patches holding `threshold` of the mean map's mass
    mean_overlay: np.ndarray
    head_overlays: list[tuple[np.ndarray, str]]
    mask_image: np.ndarray
    neighbours: list[tuple[np.ndarray, str]]
    neighbour_table: list[dict]  # rank, row, label, similarity
    message: str
    jaccard: dict | None = None  # `ground_truth_jaccard`, when a ground-truth mask was given


@dataclass
class DinoDemo:
    """The demo's state: loaded models (by name), their gallery features, the gallery itself."""

    model: str | None = None
    gallery: str | None = None
    gallery_split: str | None = None
    max_gallery_images: int | None = 1000
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR
    device: str = "cpu"
    _models: dict = field(default_factory=dict, repr=False)
    _gallery_data: GalleryData | None = field(default=None, repr=False)
    _features: dict = field(default_factory=dict, repr=False)

    def load(self, name: str | None) -> LoadedModel:
        """The model called `name` (kept loaded; the last two used stay in memory)."""
        name = (name or "").strip()
        if name not in self._models:
            loaded = load_model(name, self.device)
            self._models[name] = loaded
            while len(self._models) > 2:
                evicted = next(iter(self._models))
                self._models.pop(evicted)
                self._features.pop(evicted, None)
        return self._models[name]

    def gallery_data(self) -> GalleryData:
        if self._gallery_data is None:
            self._gallery_data = load_gallery(self.gallery, self.gallery_split, self.max_gallery_images)
        return self._gallery_data

    def gallery_features(self, loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
        if loaded.name not in self._features:
            self._features[loaded.name] = cached_gallery_features(loaded, self.gallery_data(), self.cache_dir)
        return self._features[loaded.name]

    def warm_up(self) -> str | None:
        """Load the default model and its gallery features, and answer one bundled example (the
        first call's one-off costs: eager attention, allocations); the message to show if that fails."""
        try:
            self.gallery_features(self.load(self.model))
            if example_images():
                self.analyze(example_images()[0], top_k=1)
        except AppInputError as error:
            return str(error)
        return None

    @torch.no_grad()
    def analyze(self, image_path: str | None, model_name: str | None = None, threshold: float = 0.6,
                image_size: int | None = None, top_k: int = 8, ground_truth: str | None = None) -> Analysis:
        """One image -> attention maps, mask and neighbours; given `ground_truth` (the file of the
        image's mask, see `read_ground_truth`), the masks' Jaccard with it. AppInputError for
        unusable input.

        The model sees the image's centre square (shorter side resized to the input size, the
        gallery's transform too). The attention's input size is `image_size` (default: the
        model's native size; at least 4 patches, at most `MAX_ATTENTION_TOKENS` patches, floored
        to a multiple of the patch size); the neighbour search runs at the native size, from the
        same forward pass when they agree.
        """
        if not 0 < threshold <= 1:
            raise AppInputError(f"Threshold {threshold}: give a fraction of attention mass in (0, 1].")
        loaded = self.load(model_name or self.model)
        image, note = read_image(image_path)
        truth = read_ground_truth(ground_truth, image.shape[:2]) if ground_truth else None
        patch = loaded.patch_size
        requested = max(int(image_size or loaded.image_size), 4 * patch)
        size = min(requested, max_attention_size(patch)) // patch * patch
        foreground = valid = None
        if truth is None:
            shown = centre_square(image, size)
        else:  # the truth's values are cropped and resized with the image (nearest), then read
            values, layout = truth
            shown, values = centre_square_with_mask(image, values, size)
            foreground, valid = foreground_and_valid(values, layout)
        attention, query = attention_and_feature(loaded.model, model_input(image, size, loaded))
        attention = attention[0].float().cpu()  # (heads, h, w)
        if size != loaded.image_size:
            query = backbone_cls_features(loaded.model, model_input(image, loaded.image_size, loaded))
        query = nn.functional.normalize(query.float(), dim=-1).cpu()[0]
        mean_attention = attention.mean(0)
        mask = attention_mass_masks(mean_attention, threshold)
        head_masks = attention_mass_masks(attention, threshold)
        scores = None if truth is None else ground_truth_jaccard(head_masks, mask, foreground, valid, patch)

        display = max(size, MIN_DISPLAY_SIZE)
        shown_large = _resize(shown, display)
        mean_overlay = heat_overlay(shown_large, mean_attention.numpy())
        head_overlays = [(heat_overlay(shown_large, attention[head].numpy()),
                          f"head {head}: {int(head_masks[head].sum())}/{head_masks[head].numel()} patches"
                          + (f" · J {scores['per_head'][head]:.1f}%" if scores else ""))
                         for head in range(attention.shape[0])]
        mask_image = mask_overlay(shown_large, mask.numpy(), foreground)

        neighbours, table = self._neighbours(loaded, query, top_k)
        grid = f"{attention.shape[1]}x{attention.shape[2]}"
        message = (f"`{loaded.name}`: {attention.shape[0]} heads, {size}x{size} px input ({grid} patches of "
                   f"{patch} px); the mask keeps {int(mask.sum())}/{mask.numel()} patches holding {threshold:.0%} "
                   f"of the mean attention. Neighbours: top {len(table)} of {self._features[loaded.name][0].shape[0]}"
                   f" images in {self.gallery_data().name} by cosine similarity.")
        if requested > max_attention_size(patch):
            message += (f" The input size was capped at {size} px: at most {MAX_ATTENTION_TOKENS:,} patches of "
                        f"{patch} px.")
        if scores:
            message += (f" **Jaccard with the ground truth** (yellow outline): the mean attention's mask "
                        f"{scores['averaged_attention']:.1f}%, the best head (head {scores['best_head']['index']}) "
                        f"{scores['best_head']['jaccard']:.1f}%, the heads' mean {np.mean(scores['per_head']):.1f}%.")
        if note:
            message += f" Input {note}."
        return Analysis(attention=attention, mask=mask, mean_overlay=mean_overlay, head_overlays=head_overlays,
                        mask_image=mask_image, neighbours=neighbours, neighbour_table=table, message=message,
                        jaccard=scores)

    def _neighbours(self, loaded: LoadedModel, query: torch.Tensor, top_k: int
                    ) -> tuple[list[tuple[np.ndarray, str]], list[dict]]:
        """query (D,) L2-normalised feature -> the top-k gallery images with captions, and the table."""
        features, rows = self.gallery_features(loaded)
        scores, order = (features @ query).topk(min(int(top_k), features.shape[0]))
        gallery = self.gallery_data()
        pictures, table = [], []
        for rank, (score, position) in enumerate(zip(scores.tolist(), order.tolist()), start=1):
            row = int(rows[position])
            label = gallery.label(row)
            table.append({"rank": rank, "row": row, "label": label, "similarity": round(score, 4)})
            picture = gallery.image(row)
            if max(picture.shape[:2]) < 128:  # CIFAR's 32 px thumbnails: enlarge for the page
                picture = _resize(centre_square(picture, min(picture.shape[:2])), 128)
            pictures.append((picture, f"{label + ' · ' if label else ''}{score:.3f}"))
        return pictures, table

    def answer(self, image_path, model_name, threshold, image_size, top_k, ground_truth=None):
        """The Gradio handler: (message, mean overlay, head gallery, mask, neighbour gallery, neighbour
        scores, Jaccard scores or None without a ground truth). Unusable input gives the message and
        empty outputs; the server keeps serving."""
        try:
            result = self.analyze(image_path, model_name, float(threshold), int(image_size or 0) or None,
                                  int(top_k), ground_truth or None)
        except AppInputError as error:
            return f"⚠️ {error}", None, [], None, [], [], None
        except Exception as error:  # anything unexpected: say so in the page, keep serving
            logger.exception("analysis failed")
            return f"⚠️ The analysis failed: {type(error).__name__}: {error}", None, [], None, [], [], None
        return (result.message, result.mean_overlay, result.head_overlays, result.mask_image, result.neighbours,
                result.neighbour_table, result.jaccard)


def example_images() -> list[str]:
    """The bundled example images (a few CIFAR-10 demo-sample images, enlarged to 128 px)."""
    return sorted(str(path) for path in EXAMPLES_DIR.glob("*.png"))


def build_app(model: str | None = None, gallery: str | None = None, threshold: float = 0.6,
              gallery_split: str | None = None, max_gallery_images: int | None = 1000,
              cache_dir: str | Path | None = DEFAULT_CACHE_DIR, top_k: int = 8, warm_up: bool = True,
              demo: DinoDemo | None = None):
    """The Gradio page. `model`: backbone folder or Hub id (None: the demo run's teacher if it
    exists, else the page explains how to get one); `gallery`: dataset for the neighbours (None:
    the embedded demo sample). With `warm_up`, the model and gallery features load now, so the
    first image is answered at full speed. API endpoint: `/analyze`."""
    import gradio as gr

    demo = demo or DinoDemo(model=model if model is not None else default_model(), gallery=gallery,
                            gallery_split=gallery_split, max_gallery_images=max_gallery_images,
                            cache_dir=cache_dir)
    start_message = NO_MODEL_MESSAGE if not demo.model else (demo.warm_up() if warm_up else None)
    start_message = f"⚠️ {start_message}" if start_message else (
        f"Model `{demo.model}` ready. Upload an image or click an example, then **Analyze**.")
    # the slider's top: MAX_ATTENTION_TOKENS patches of the loaded model (of 16 px without one);
    # `analyze` caps any model the same way
    patch = demo._models[demo.model.strip()].patch_size if demo.model and demo.model.strip() in demo._models else 16
    size_limit = max_attention_size(patch)

    with gr.Blocks(title="DINO: attention and neighbours", delete_cache=DELETE_CACHE) as page:
        gr.Markdown("# DINO: what a self-supervised ViT attends to, and what it finds similar\n"
                    "Last-block CLS attention (mean and per head), the patches holding the threshold's share of "
                    "the attention, and the nearest gallery images by cosine similarity of the CLS feature.")
        with gr.Row():
            with gr.Column(scale=1):
                image = lenient_image_input(label="Image", height=256, sources=["upload", "clipboard"],
                                            elem_id="input-image")
                model_box = gr.Textbox(value=demo.model or "", label="Model (backbone folder or Hub id)",
                                       placeholder=str(DEFAULT_MODEL_DIR), elem_id="model")
                threshold_slider = gr.Slider(0.05, 1.0, value=threshold, step=0.05, elem_id="threshold",
                                             label="Mask threshold (share of attention mass kept)")
                size_slider = gr.Slider(0, size_limit, value=0, step=8, elem_id="image-size",
                                        label=f"Attention input size in px (0: the model's native size; at most "
                                              f"{MAX_ATTENTION_TOKENS:,} patches, {size_limit} px here)")
                top_k_slider = gr.Slider(1, 24, value=top_k, step=1, label="Neighbours", elem_id="top-k")
                with gr.Accordion("Ground-truth mask (optional): score the masks by Jaccard", open=False):
                    truth_image = lenient_image_input(
                        label="The image's mask, same size (non-zero = object; palette PNG: 255 ignored)",
                        height=160, sources=["upload", "clipboard"], elem_id="ground-truth")
                button = gr.Button("Analyze", variant="primary", elem_id="analyze")
                gr.Examples(examples=[[path] for path in example_images()], inputs=[image], label="Examples")
            with gr.Column(scale=2):
                status = gr.Markdown(start_message, elem_id="status")
                with gr.Row():
                    mean_image = gr.Image(label="Mean attention", elem_id="mean-attention", interactive=False,
                                          format="png")
                    mask_image = gr.Image(label="Thresholded mask", elem_id="mask", interactive=False, format="png")
                heads = gr.Gallery(label="Every head (patches holding the threshold's share of its attention)",
                                   elem_id="heads", columns=3, fit_columns=False, object_fit="contain",
                                   format="png")
                neighbours = gr.Gallery(label="Nearest neighbours in the gallery (label · cosine similarity)",
                                        elem_id="neighbours", columns=4, fit_columns=False,
                                        object_fit="contain", format="png")
                with gr.Accordion("Scores: neighbours' similarity, and the masks' Jaccard given a mask", open=False):
                    scores = gr.JSON(label="neighbours", elem_id="scores")
                    jaccard_scores = gr.JSON(label="Jaccard with the ground truth (percent)", elem_id="jaccard")
        inputs = [image, model_box, threshold_slider, size_slider, top_k_slider, truth_image]
        outputs = [status, mean_image, heads, mask_image, neighbours, scores, jaccard_scores]
        # one analysis at a time (one queue for both events): the CPU's cores go to one forward pass
        button.click(demo.answer, inputs, outputs, api_name="analyze", concurrency_id="analyze")
        image.upload(demo.answer, inputs, outputs, api_visibility="private", concurrency_id="analyze")
    page.dino_demo = demo
    return page


def lenient_image_input(**kwargs):
    """A `gr.Image` input (type "filepath") that hands over the uploaded file's path even when
    PIL cannot open it, so that `read_image` reports a non-image upload in the page instead of
    Gradio failing in its preprocessing. (The instance's `preprocess` is wrapped: a subclass of
    a Gradio component would make Gradio write a .pyi stub beside this module.)"""
    import gradio as gr

    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    strict_preprocess = image.preprocess

    def preprocess(payload):
        try:
            return strict_preprocess(payload)
        except Exception:
            return None if payload is None or payload.path is None else str(payload.path)

    image.preprocess = preprocess
    return image
