"""Serve the interactive demo: a Gradio page with a DINO ViT's attention maps and an image's
nearest neighbours in a gallery (needs the `app` extra: pip install -e ".[app]").

    python scripts/app.py --model outputs/demo_cifar10_cpu/teacher_backbone
    python scripts/app.py --model facebook/dino-vits16 --gallery path/to/images --port 7861

Open http://127.0.0.1:PORT. The server listens on 127.0.0.1 only, unless --host says otherwise;
--share (a public gradio.live link) is off unless asked. Without --model, the demo run's
teacher (outputs/demo_cifar10_cpu/teacher_backbone) when it exists; else the page says how to
get one. Gallery features are computed once per (model, gallery) and cached in --cache_dir.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import model_field, parse_args, usage_error


@dataclass
class Arguments:
    model: str | None = model_field(required=False, help=(
        "backbone folder (teacher_backbone/), DinoModel folder (dino/) or Hub id such as facebook/dino-vits16; "
        "default: outputs/demo_cifar10_cpu/teacher_backbone when it exists"))
    gallery: str | None = field(default=None, metadata={
        "help": "dataset whose images the neighbours come from (Hub id, local folder or glob, as --dataset_name); "
                "default: the embedded CIFAR-10 demo sample"})
    gallery_split: str | None = field(default=None, metadata={
        "help": "split of --gallery; default: the first of validation, test, val, valid, train that exists"})
    max_gallery_images: int = field(default=1000, metadata={"help": "use the first N gallery images only"})
    threshold: float = field(default=0.6, metadata={
        "help": "initial mask threshold: share of the attention mass the mask keeps, in (0, 1]"})
    top_k: int = field(default=8, metadata={"help": "initial number of neighbours shown"})
    port: int = field(default=7860, metadata={"help": "port to serve on"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on (0.0.0.0 exposes the app to your network)"})
    share: bool = field(default=False, metadata={"help": "also open a public gradio.live link"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "folder of the cached gallery features (default: ~/.cache/hf_dino/app_gallery, or "
                "$HF_DINO_CACHE/app_gallery)"})

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"--threshold {self.threshold}: must lie in (0, 1]")
        if self.top_k < 1:
            raise ValueError(f"--top_k {self.top_k}: must be >= 1")
        if self.max_gallery_images < 1:
            raise ValueError(f"--max_gallery_images {self.max_gallery_images}: must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: must lie in 0..65535")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(Arguments, argv=argv, description=__doc__)
    try:
        import gradio  # noqa: F401
    except ImportError:
        usage_error('the app needs Gradio: pip install -e ".[app]" (or pip install gradio)')
    from ..demo.app import DEFAULT_CACHE_DIR, build_app, load_gallery
    from ..data import looks_like_local_path

    if args.model and looks_like_local_path(args.model) and not Path(args.model).expanduser().is_dir():
        usage_error(f"--model {args.model}: no such folder; give a backbone folder (e.g. "
                    "outputs/demo_cifar10_cpu/teacher_backbone, written by `accelerate launch scripts/pretrain.py`) "
                    "or a Hub id")
    if args.port and not port_is_free(args.host, args.port):
        usage_error(f"--port {args.port}: already in use on {args.host}; choose another (e.g. --port {args.port + 1})")
    try:
        load_gallery(args.gallery, args.gallery_split, args.max_gallery_images)
    except Exception as error:  # missing path, Hub unreachable, unknown split, unreadable files, ...
        reason = error.args[0] if isinstance(error, KeyError) and error.args else str(error) or type(error).__name__
        usage_error(f"--gallery {args.gallery or '(the embedded demo sample)'}: {str(reason).splitlines()[0]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    page = build_app(model=args.model, gallery=args.gallery, threshold=args.threshold,
                     gallery_split=args.gallery_split, max_gallery_images=args.max_gallery_images,
                     cache_dir=args.cache_dir or DEFAULT_CACHE_DIR, top_k=args.top_k)
    page.launch(server_name=args.host, server_port=args.port or None, share=args.share, show_error=True,
                max_file_size="100mb")


if __name__ == "__main__":
    main()
