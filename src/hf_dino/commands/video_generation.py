"""Self-attention video: the last block's CLS attention of a ViT on every frame of a video.

Reads a video file (through PyAV/FFmpeg) or a folder of frames, and writes per frame the mean
attention over heads colour-mapped over the frame (OUTPUT_DIR/attention/NNNNN.png), every head's
map (OUTPUT_DIR/heads/NNNNN-headH.png), with --threshold the frame masked to the most-attended
patches holding that share of the attention mass (OUTPUT_DIR/masks/NNNNN.png; the reference's
visualize_attention.py rule), and OUTPUT_DIR/attention.mp4 at the input's frame rate (a folder:
--fps, default 30). One forward pass per batch of frames, SDPA below the last block and only the
[CLS] row of the last block's attention, so long 480p clips stay within a few hundred MB.

  python scripts/video_generation.py --model dino-vits8 --input clip.mp4 --output_dir attention_clip \\
      --threshold 0.6 --resize 480
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cli import emit_json, model_field, parse_args, usage_error
from .model_loading import default_device, load_model_or_exit


@dataclass
class Arguments:
    model: str = model_field()
    input: str = field(metadata={"help": "video file (mp4, avi, webm, ...) or folder of frames (sorted by name)"})
    output_dir: str = field(metadata={"help": "PNGs and attention.mp4 are written here"})
    threshold: float | None = field(default=None, metadata={
        "help": "also write masks keeping the most-attended patches holding this share of the attention mass "
                "(the paper uses 0.6)"})
    fps: float | None = field(default=None, metadata={
        "help": "frame rate of attention.mp4; default: the input video's, 30 for a frame folder"})
    resize: int | None = field(default=None, metadata={
        "help": "resize frames so their short side is this many pixels first (default: native size)"})
    batch_size: int = field(default=4, metadata={"help": "frames per forward pass"})
    device: str | None = field(default=None, metadata={"help": "torch device; default cuda when available, else cpu"})
    output_json: str | None = field(default=None, metadata={"help": "write the summary JSON here (it is also printed)"})

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"--threshold {self.threshold}: must lie in (0, 1]")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"--fps {self.fps}: must be > 0")
        if self.resize is not None and self.resize < 1:
            raise ValueError(f"--resize {self.resize}: must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size {self.batch_size}: must be >= 1")


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(Arguments, argv=argv, description=__doc__)
    from ..visualization.attention import vit_backbone
    from ..visualization.attention_video import VideoInputError, generate_attention_video, open_video

    try:
        open_video(args.input, args.fps)
    except VideoInputError as error:
        usage_error(f"--input {args.input}: {error}")
    device = default_device(args.device)
    model, _ = load_model_or_exit(args.model, device)
    try:
        vit_backbone(model)
    except ValueError as error:
        usage_error(f"--model {args.model}: {str(error).splitlines()[0]}")
    try:
        summary = generate_attention_video(model, args.input, args.output_dir, args.threshold, args.fps, args.resize,
                                           args.batch_size, device)
    except VideoInputError as error:
        usage_error(str(error))
    summary["model"] = args.model
    emit_json(summary, args.output_json)


if __name__ == "__main__":
    main()
