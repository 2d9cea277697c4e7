"""Attention videos (DINO's self-attention videos): the last block's CLS attention on every frame.

A video file (anything FFmpeg reads, through PyAV) or a folder of frames is read frame by frame;
each frame (optionally resized so its short side is `resize`, then cropped to a multiple of the
patch size, as the reference does) goes through the ViT, and the CLS token's attention to the
patches in the last block gives one (H/p, W/p) map per head and their mean (one pass per batch
of frames that computes only the CLS row of the last block: `last_block_cls_attention`). Written under
OUTPUT_DIR:

- `attention/NNNNN.png`: the mean map, colour-mapped (inferno) over the frame;
- `heads/NNNNN-headH.png`: each head's map over the frame;
- `masks/NNNNN.png` (with a threshold): the frame kept where the most-attended patches holding
  `threshold` of the mean map's mass lie (`attention_mass_masks`, the reference's rule),
  darkened elsewhere;
- `attention.mp4`: the `attention/` frames at the input's frame rate (H.264, or MPEG-4 Part 2
  where the FFmpeg build lacks libx264).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .attention import attention_mass_masks, last_block_cls_attention, upsample_to_image, vit_backbone

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_FPS = 30.0  # a frame folder has no frame rate of its own (the reference's default)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VideoInputError(ValueError):
    """Unreadable or inconsistent input; the message names the file."""


@dataclass
class VideoSource:
    """Frames of a video file or folder: `frames()` yields (name, (H, W, 3) uint8 RGB)."""

    path: Path
    fps: float
    num_frames: int | None

    def frames(self) -> Iterator[tuple[str, np.ndarray]]:
        if self.path.is_dir():
            for index, file in enumerate(frame_files(self.path)):
                try:
                    with Image.open(file) as image:
                        yield f"{index:05d}", np.array(image.convert("RGB"))
                except (OSError, SyntaxError) as error:
                    raise VideoInputError(f"{file}: unreadable frame ({error})") from error
            return
        import av

        try:
            with av.open(str(self.path)) as container:
                for index, frame in enumerate(container.decode(video=0)):
                    yield f"{index:05d}", frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as error:
            raise VideoInputError(f"{self.path}: cannot decode the video ({error})") from error


def frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def open_video(path: str | Path, fps: float | None = None) -> VideoSource:
    """A video file or frame folder; `fps` overrides the file's frame rate (a folder's default is 30)."""
    path = Path(path)
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise VideoInputError(f"{path}: no frame ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        return VideoSource(path, fps or DEFAULT_FPS, len(files))
    if not path.is_file():
        raise VideoInputError(f"{path}: no such video file or frame folder")
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoInputError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            count = stream.frames or None
    except av.error.FFmpegError as error:
        raise VideoInputError(f"{path}: not a readable video ({error})") from error
    return VideoSource(path, fps or (float(rate) if rate else DEFAULT_FPS), count)


def prepare_frame(image: np.ndarray, patch_size: int, resize: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """(H, W, 3) uint8 -> (the frame as the model sees it (H', W', 3) uint8, normalised (3, H', W')):
    short side resized to `resize` (bicubic) when given, then cropped to a multiple of the patch size."""
    if resize:
        height, width = image.shape[:2]
        scale = resize / min(height, width)
        image = np.array(Image.fromarray(image).resize((round(width * scale), round(height * scale)), Image.BICUBIC))
    height, width = image.shape[0] // patch_size * patch_size, image.shape[1] // patch_size * patch_size
    if height == 0 or width == 0:
        raise VideoInputError(f"frame of {image.shape[1]}x{image.shape[0]} is smaller than the patch size {patch_size}")
    image = np.ascontiguousarray(image[:height, :width])
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image, (pixels - mean) / std


def colorize(heat: np.ndarray, colormap: str = "inferno") -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8, min-max normalised through a matplotlib colour map."""
    from matplotlib import colormaps

    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    return (colormaps[colormap](scaled)[..., :3] * 255).astype(np.uint8)


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """alpha * overlay + (1 - alpha) * image, uint8."""
    return (alpha * overlay.astype(np.float32) + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)


def render_frame(image: np.ndarray, attention: torch.Tensor, patch_size: int,
                 threshold: float | None = None) -> dict[str, np.ndarray]:
    """One frame's pictures. image (H, W, 3) uint8; attention (heads, H/p, W/p).

    Returns {"mean": overlay, "head0": overlay, ..., "mask": masked frame (with a threshold)}."""
    mean = attention.mean(dim=0, keepdim=True)
    pictures = {"mean": blend(image, colorize(upsample_to_image(mean, patch_size)[0].numpy()))}
    for head, heat in enumerate(upsample_to_image(attention, patch_size).numpy()):
        pictures[f"head{head}"] = blend(image, colorize(heat))
    if threshold is not None:
        keep = upsample_to_image(attention_mass_masks(mean, threshold), patch_size)[0].numpy()
        pictures["mask"] = np.where(keep[..., None], image, (image * 0.25).astype(np.uint8))
    return pictures


class Mp4Writer:
    """Frames (H, W, 3) uint8 -> an MP4 at `fps` (sizes cropped to even numbers for yuv420p)."""

    def __init__(self, path: Path, fps: float):
        import av

        self.path = path
        self.container = av.open(str(path), "w", format="mp4")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        self.stream.pix_fmt = "yuv420p"
        self.size: tuple[int, int] | None = None

    def write(self, frame: np.ndarray) -> None:
        import av

        if self.size is None:
            self.size = (frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2)
            self.stream.height, self.stream.width = self.size
        frame = np.ascontiguousarray(frame[:self.size[0], :self.size[1]])
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def generate_attention_video(model: nn.Module, input_path: str | Path, output_dir: str | Path,
                             threshold: float | None = None, fps: float | None = None, resize: int | None = None,
                             batch_size: int = 4, device: torch.device | str = "cpu",
                             progress: bool = True) -> dict:
    """Write the attention PNGs and `attention.mp4` for every frame of `input_path` (see the
    module docstring). Returns {"frames", "fps", "heads", "size", "video", ...}.
    The MP4 is written as `attention.mp4.partial` and renamed when every frame succeeded."""
    vit = vit_backbone(model).to(device).eval()
    patch_size = vit.config.patch_size
    source = open_video(input_path, fps)
    output_dir = Path(output_dir)
    folders = {name: output_dir / name for name in ("attention", "heads") + (("masks",) if threshold else ())}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    partial = output_dir / "attention.mp4.partial"
    writer = Mp4Writer(partial, source.fps)
    frames, size, heads = 0, None, 0

    def flush(batch: list[tuple[str, np.ndarray, torch.Tensor]]) -> None:
        nonlocal heads
        pixels = torch.stack([p for _, _, p in batch]).to(device)
        attention = last_block_cls_attention(vit, pixels).float().cpu()
        heads = attention.shape[1]
        for (name, image, _), maps in zip(batch, attention):
            pictures = render_frame(image, maps, patch_size, threshold)
            Image.fromarray(pictures["mean"]).save(folders["attention"] / f"{name}.png")
            for head in range(heads):
                Image.fromarray(pictures[f"head{head}"]).save(folders["heads"] / f"{name}-head{head}.png")
            if threshold:
                Image.fromarray(pictures["mask"]).save(folders["masks"] / f"{name}.png")
            writer.write(pictures["mean"])

    try:
        batch: list = []
        for name, raw in tqdm(source.frames(), total=source.num_frames, desc="attention", disable=not progress):
            image, pixels = prepare_frame(raw, patch_size, resize)
            if size is None:
                size = image.shape[:2]
            elif image.shape[:2] != size:
                raise VideoInputError(f"{source.path}: frame {name} is {image.shape[1]}x{image.shape[0]}, the first "
                                      f"{size[1]}x{size[0]}; all frames must have one size")
            batch.append((name, image, pixels))
            frames += 1
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        if frames == 0:
            raise VideoInputError(f"{source.path}: no frame decoded")
        writer.close()
    except BaseException:
        with_exception_cleanup(writer, partial)
        raise
    video = output_dir / "attention.mp4"
    partial.replace(video)
    return {"frames": frames, "fps": source.fps, "heads": heads, "size": list(size), "patch_size": patch_size,
            "threshold": threshold, "video": str(video),
            "pngs": {name: str(folder) for name, folder in folders.items()}}


def with_exception_cleanup(writer: Mp4Writer, partial: Path) -> None:
    try:
        writer.container.close()
    except Exception:  # noqa: BLE001 - the original error matters, not the cleanup's
        pass
    partial.unlink(missing_ok=True)
