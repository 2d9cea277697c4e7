#!/usr/bin/env python
"""Latency of the demo app (hf_dino.app) for a ViT-S/16 on this machine's CPU.

A randomly initialised ViT-S/16 (224 px, 6 heads, 12 blocks; the weights do not change the
cost) is saved, the app is built (model load + gallery features: "start-up") and served on a
free local port; then one 224x224-or-larger photo-like image is answered through the Gradio API
(gradio_client: upload, attention maps, mask, neighbours, PNG encoding), first once and then
--repeats more times (median); also the round trip with the client fetching the 16 result images
one by one, and `DinoDemo.analyze` alone. The goal: one image in under 2 s after start-up.

    python benchmarks/app_latency.py [--gallery_images 256] [--repeats 5] [--threads N] [--output_json F]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery_images", type=int, default=256,
                        help="gallery size (the demo sample's first N test images); start-up grows with it")
    parser.add_argument("--repeats", type=int, default=5, help="answers timed after the first one")
    parser.add_argument("--image_size", type=int, default=480, help="side of the uploaded (square) image")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import gradio_client
    from transformers import ViTConfig, ViTModel

    from hf_dino.app import DinoDemo, build_app, load_gallery

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        torch.manual_seed(0)
        config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12,
                           num_attention_heads=6, intermediate_size=1536, layer_norm_eps=1e-6, qkv_bias=True)
        ViTModel(config, add_pooling_layer=False).save_pretrained(scratch / "vit_small_16")
        photo = scratch / "photo.png"
        gallery_image = load_gallery(None, max_images=1).image(0)
        Image.fromarray(gallery_image).resize((args.image_size, args.image_size), Image.BICUBIC).save(photo)

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
