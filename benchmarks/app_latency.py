#!/usr/bin/env python
"""Latency of the demo app (hf_dino.demo.app) for a ViT-S/16 on this machine's CPU.

A randomly initialised ViT-S/16 (224 px, 6 heads, 12 blocks; the weights do not change the
cost) is saved, the app is built (model load + gallery features: "start-up") and served on a
free local port; then one 224x224-or-larger photo-like image is answered through the Gradio API
(gradio_client: upload, attention maps, mask, neighbours, PNG encoding), first once and then
--repeats more times (median); also the round trip with the client fetching the 16 result images
one by one, and `DinoDemo.analyze` alone. The goal: one image in under 2 s after start-up.

`--largest_request` measures memory instead: a random ViT-S/8 (224 px native) answers, in
process, the largest attention input the app allows (`hf_dino.demo.app.MAX_ATTENTION_TOKENS` patches:
512 px at patch 8, 4,096 tokens; 512 px where the app has no token cap), after a warm-up at the
native size; the process's RSS is sampled every 2 ms during that request. The goal: under 1.5 GB.

    python benchmarks/app_latency.py [--gallery_images 256] [--repeats 5] [--threads N] [--output_json F]
    python benchmarks/app_latency.py --largest_request [--gallery_images 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def random_vit_small_and_photo(folder: Path, patch_size: int, image_size: int) -> Path:
    """Save a seeded random ViT-S/`patch_size` as `folder/vit_small_{patch_size}` and the first demo
    image, resized to `image_size`, as `folder/photo.png` (returned)."""
    from transformers import ViTConfig, ViTModel

    from hf_dino.demo.app import load_gallery

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=patch_size, hidden_size=384, num_hidden_layers=12,
                       num_attention_heads=6, intermediate_size=1536, layer_norm_eps=1e-6, qkv_bias=True)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder / f"vit_small_{patch_size}")
    photo = folder / "photo.png"
    gallery_image = load_gallery(None, max_images=1).image(0)
    Image.fromarray(gallery_image).resize((image_size, image_size), Image.BICUBIC).save(photo)
    return photo


def largest_request_memory(args) -> dict:
    """Peak RSS of one request at the app's largest attention input, for a random ViT-S/8."""
    import psutil

    from hf_dino.demo import app as app_module

    process = psutil.Process()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        photo = random_vit_small_and_photo(scratch, patch_size=8, image_size=args.image_size)
        demo = app_module.DinoDemo(model=str(scratch / "vit_small_8"), max_gallery_images=args.gallery_images,
                                   cache_dir=scratch / "cache")
        demo.analyze(str(photo), top_k=8)  # model, gallery features, one answer at the native size
        limit = getattr(app_module, "max_attention_size", None)
        size = limit(8) if limit else 512
        before = process.memory_info().rss
        peak, done = [before], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        begin = time.perf_counter()
        result = demo.analyze(str(photo), image_size=size, top_k=8)
        seconds = time.perf_counter() - begin
        done.set()
        sampler.join()
    return {
        "model": "ViT-S/8 (random init), 224 px native",
        "attention_input_px": size,
        "tokens": int(result.attention.shape[1] * result.attention.shape[2]) + 1,
        "token_cap": getattr(app_module, "MAX_ATTENTION_TOKENS", None),
        "gallery_images": args.gallery_images,
        "rss_before_request_gb": round(before / 1e9, 3),
        "peak_rss_during_request_gb": round(peak[0] / 1e9, 3),
        "process_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
        "request_s": round(seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "goal_gb": 1.5,
        "goal_met": bool(peak[0] / 1e9 < 1.5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery_images", type=int, default=256,
                        help="gallery size (the demo sample's first N test images); start-up grows with it")
    parser.add_argument("--repeats", type=int, default=5, help="answers timed after the first one")
    parser.add_argument("--image_size", type=int, default=480, help="side of the uploaded (square) image")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--largest_request", action="store_true",
                        help="measure the peak RSS of the app's largest allowed request instead of latency")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.largest_request:
        text = json.dumps(largest_request_memory(args), indent=2)
        print(text)
        if args.output_json:
            Path(args.output_json).write_text(text + "\n")
        return

    import gradio_client

    from hf_dino.demo.app import DinoDemo, build_app

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        photo = random_vit_small_and_photo(scratch, patch_size=16, image_size=args.image_size)

        start = time.perf_counter()
        demo = DinoDemo(model=str(scratch / "vit_small_16"), max_gallery_images=args.gallery_images,
                        cache_dir=scratch / "cache")
        page = build_app(demo=demo)
        startup_s = time.perf_counter() - start
        port = free_port()
        page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            url = f"http://127.0.0.1:{port}/"
            answered = gradio_client.Client(url, verbose=False, download_files=False)  # outputs ready on the server
            downloaded = gradio_client.Client(url, verbose=False)  # ... and the 16 result images fetched, one by one

            def answer(client) -> float:
                begin = time.perf_counter()
                message, mean_image, *_ = client.predict(gradio_client.handle_file(str(photo)), "", 0.6, 0, 8,
                                                         api_name="/analyze")
                elapsed = time.perf_counter() - begin
                if mean_image is None:
                    raise RuntimeError(message)
                return elapsed

            first_s = answer(answered)
            repeats = [answer(answered) for _ in range(args.repeats)]
            round_trips = [answer(downloaded) for _ in range(args.repeats)]
            in_process = []
            for _ in range(args.repeats):
                begin = time.perf_counter()
                demo.analyze(str(photo), top_k=8)
                in_process.append(time.perf_counter() - begin)
        finally:
            page.close()

    result = {
        "model": "ViT-S/16 (random init), 224 px",
        "gallery_images": args.gallery_images,
        "uploaded_image": f"{args.image_size}x{args.image_size} PNG",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "startup_s": round(startup_s, 2),
        "first_answer_s": round(first_s, 3),
        "median_answer_s": round(statistics.median(repeats), 3),
        "median_analyze_in_process_s": round(statistics.median(in_process), 3),
        "median_round_trip_with_downloads_s": round(statistics.median(round_trips), 3),
        "answers_s": [round(value, 3) for value in repeats],
        "goal_s": 2.0,
        "goal_met": bool(max(first_s, statistics.median(repeats)) < 2.0),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output_json:
        Path(args.output_json).write_text(text + "\n")


if __name__ == "__main__":
    main()
