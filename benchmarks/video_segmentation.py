#!/usr/bin/env python
"""DAVIS label propagation: hf_dino against the reference's eval_video_segmentation.py, same run.

Both run as child processes with the same thread count on the same frames (a temporary
DAVIS-2017 layout built from DATA_PATH: 0/1 palette masks, optionally the first --max_frames
frames of each sequence). Measured: frames/s of the propagation loop (model loading excluded,
feature extraction included), peak resident memory of each process (and peak CUDA memory on a
GPU), and J&F of both outputs scored by the official DAVIS toolkit, next to the J&F hf_dino's
script reports itself. Prints a table and a JSON summary.

    python benchmarks/video_segmentation.py --model HF_FOLDER --reference_checkpoint REF.pth \\
        --data_path ../shared/data/davis --output_dir /tmp/vs_bench [--max_frames 20] [--threads 2]

The reference side runs in --reference_python (a venv with torch, torchvision, opencv) from
--reference_root (a facebookresearch/dino checkout); its code is imported, not copied: a small
runner replaces `.cuda()` by a no-op on CPU and supplies the DAVIS palette it would download.

Helpers (used by the benchmark, also handy alone):
    python benchmarks/video_segmentation.py reference-checkpoint --from_hf HF_FOLDER --output REF.pth
    python benchmarks/video_segmentation.py reference-checkpoint --arch vit_small --patch_size 16 \\
        --seed 0 --output REF.pth          # (in the reference venv) random reference weights
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
DEFAULT_REFERENCE_PYTHON = "/work/refvenv/bin/python"
DEFAULT_REFERENCE_ROOT = "/work/ref/dino"
DEFAULT_TOOLKIT_ROOT = "/work/ref/davis2017-evaluation"
SUMMARY_KEYS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


# --------------------------------------------------------------------------------------------
# Runs inside the reference venv
# --------------------------------------------------------------------------------------------

def reference_checkpoint(args: argparse.Namespace) -> None:
    """Write a reference-format ViT state dict: hf weights mapped back, or the reference's own
    architecture with seeded random weights."""
    import torch

    if args.from_hf:
        from transformers import AutoModel

        from hf_dino.conversion import reference_vit_state_dict
        from hf_dino.evaluation.video_segmentation import video_backbone

        vit = video_backbone(AutoModel.from_pretrained(args.from_hf))
        state = reference_vit_state_dict(vit.state_dict())
    else:
        sys.path.insert(0, args.reference_root)
        import vision_transformer as vits

        torch.manual_seed(args.seed)
        state = vits.__dict__[args.arch](patch_size=args.patch_size, num_classes=0).state_dict()
    torch.save(state, args.output)
    print(json.dumps({"checkpoint": args.output, "tensors": len(state)}))


def reference_run(args: argparse.Namespace) -> None:
    """Run the reference's label propagation (its functions, its protocol) on CPU or GPU."""
    import math
    import types
    from functools import partial

    import torch
    from torch import nn

    sys.path.insert(0, args.reference_root)
    if not torch.cuda.is_available():  # the script hard-codes .cuda()
        torch.Tensor.cuda = lambda self, *a, **k: self
        nn.Module.cuda = lambda self, *a, **k: self
    import eval_video_segmentation as reference
    import vision_transformer as vits

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    model = vits.VisionTransformer(img_size=[grid * patch], patch_size=patch, embed_dim=dim, depth=depth,
                                   num_heads={192: 3, 384: 6, 768: 12}[dim], mlp_ratio=4, qkv_bias=True,
                                   norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0)
    model.load_state_dict(state, strict=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad = False

    options = types.SimpleNamespace(output_dir=args.output_dir, n_last_frames=args.n_last_frames,
                                    size_mask_neighborhood=args.size_mask_neighborhood, topk=args.topk,
                                    patch_size=patch)
    reference.args = options  # restrict_neighborhood reads the module-level `args`
    from hf_dino.evaluation.video_segmentation import davis_palette

    palette = davis_palette()
    videos = [line.strip() for line in open(os.path.join(args.data_path, "ImageSets/2017/val.txt")) if line.strip()]
    frames = 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for video in videos:
        video_dir = os.path.join(args.data_path, "JPEGImages/480p/", video)
        frame_list = reference.read_frame_list(video_dir)
        first_path = frame_list[0].replace("JPEGImages", "Annotations").replace("jpg", "png")
        first_seg, seg_original = reference.read_seg(first_path, patch)
        reference.eval_video_tracking_davis(options, model, frame_list, video_dir, first_seg, seg_original, palette)
        frames += len(frame_list) - 1
    seconds = time.perf_counter() - start
    result = {"frames": frames, "seconds": seconds, "seconds_per_frame": seconds / frames}
    if device == "cuda":
        result["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    Path(args.json).write_text(json.dumps(result))


def toolkit_score(args: argparse.Namespace) -> None:
    """Score a results folder with the official DAVIS toolkit (semi-supervised, val)."""
    import numpy as np

    sys.path.insert(0, args.toolkit_root)
    from davis2017.evaluation import DAVISEvaluation

    metrics = DAVISEvaluation(davis_root=args.davis_path, task="semi-supervised", gt_set="val").evaluate(
        args.results_path)
    j, f = metrics["J"], metrics["F"]
    result = {"J&F-Mean": 100 * (np.mean(j["M"]) + np.mean(f["M"])) / 2}
    for name, measure in (("J", j), ("F", f)):
        for key, statistic in (("Mean", "M"), ("Recall", "R"), ("Decay", "D")):
            result[f"{name}-{key}"] = 100 * float(np.mean(measure[statistic]))
    result["per_object"] = {k: {"J-Mean": 100 * j["M_per_object"][k], "F-Mean": 100 * f["M_per_object"][k]}
                            for k in j["M_per_object"]}
    Path(args.json).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# Orchestration (main environment)
# --------------------------------------------------------------------------------------------

def build_davis2017_layout(data_path: Path, sequences: list[str] | None, max_frames: int | None, root: Path) -> list[str]:
    """A DAVIS-2017 copy of `data_path` (frames linked, masks rewritten as 0..n palette PNGs,
    ImageSets/2017/val.txt) that both the reference script and the toolkit read."""
    import numpy as np
    from PIL import Image

    from hf_dino.evaluation.video_segmentation import davis_palette, image_set_names, load_sequence, read_annotation

    names = sequences or image_set_names(data_path)
    palette = davis_palette().ravel().tolist()
    for name in names:
        sequence = load_sequence(data_path, name)
        frames = sequence.frames[:max_frames] if max_frames else sequence.frames
        frame_dir = root / "JPEGImages" / "480p" / name
        mask_dir = root / "Annotations" / "480p" / name
        frame_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        _, _, binary = read_annotation(sequence.first_annotation)
        for frame in frames:
            link = frame_dir / frame.name
            if not link.exists():
                link.symlink_to(frame.resolve())
            ids, _, _ = read_annotation(sequence.annotations[frame.stem], binary)
            image = Image.fromarray(ids.astype(np.uint8), mode="P")
            image.putpalette(palette)
            image.save(mask_dir / f"{frame.stem}.png")
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names) + "\n")
    return names


def run_child(command: list[str], threads: int, log_path: Path) -> tuple[float, float]:
    """Run a child process; (wall seconds, peak resident memory MiB of that process)."""
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                       HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} ... failed (exit {process.returncode}); see {log_path}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def benchmark(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = out / "davis2017"
    names = build_davis2017_layout(Path(args.data_path), args.sequences.split(",") if args.sequences else None,
                                   args.max_frames, layout)
    propagation = ["--n_last_frames", str(args.n_last_frames), "--size_mask_neighborhood",
                   str(args.size_mask_neighborhood), "--topk", str(args.topk)]
    reference_python = [args.reference_python, str(HERE)]
    results: dict = {"sequences": names, "max_frames": args.max_frames, "threads": args.threads}

    variants = {"hf_dino": []}
    if args.reference_quirks:
        variants["hf_dino_reference_quirks"] = ["--reference_normalization", "--reference_pos_interpolation"]
    if args.each_quirk:
        variants["hf_dino_reference_normalization"] = ["--reference_normalization"]
        variants["hf_dino_reference_pos_interpolation"] = ["--reference_pos_interpolation"]
    for variant, flags in variants.items():
        json_path = out / f"{variant}.json"
        wall, peak = run_child(
            [sys.executable, "-m", "hf_dino.commands.eval_video_segmentation", "--model", args.model,
             "--data_path", str(layout), "--output_dir", str(out / variant), "--output_json", str(json_path),
             "--batch_size", str(args.batch_size), *propagation, *flags], args.threads, out / f"{variant}.log")
        reported = json.loads(json_path.read_text())
        toolkit_json = out / f"{variant}.toolkit.json"
        run_child([*reference_python, "toolkit-score", "--toolkit_root", args.toolkit_root, "--davis_path",
                   str(layout), "--results_path", str(out / variant), "--json", str(toolkit_json)], 1,
                  out / f"{variant}.toolkit.log")
        toolkit = json.loads(toolkit_json.read_text())
        results[variant] = {"reported": {k: reported[k] for k in SUMMARY_KEYS}, "toolkit": {k: toolkit[k] for k in SUMMARY_KEYS},
                            "frames_per_second": 1 / reported["seconds_per_frame"],
                            "seconds_per_frame": reported["seconds_per_frame"], "peak_rss_mb": peak, "wall_s": wall,
                            "first_mask_baseline": reported.get("first_mask_baseline")}

    if not args.skip_reference:
        reference_json = out / "reference.json"
        wall, peak = run_child([*reference_python, "reference-run", "--reference_root", args.reference_root,
                                "--checkpoint", args.reference_checkpoint, "--data_path", str(layout),
                                "--output_dir", str(out / "reference"), "--json", str(reference_json), *propagation],
                               args.threads, out / "reference.log")
        timing = json.loads(reference_json.read_text())
        toolkit_json = out / "reference.toolkit.json"
        run_child([*reference_python, "toolkit-score", "--toolkit_root", args.toolkit_root, "--davis_path",
                   str(layout), "--results_path", str(out / "reference"), "--json", str(toolkit_json)], 1,
                  out / "reference.toolkit.log")
        toolkit = json.loads(toolkit_json.read_text())
        results["reference"] = {"toolkit": {k: toolkit[k] for k in SUMMARY_KEYS},
                                "frames_per_second": 1 / timing["seconds_per_frame"],
                                "seconds_per_frame": timing["seconds_per_frame"], "peak_rss_mb": peak, "wall_s": wall}
        for variant in variants:
            ours = results[variant]
            ours["frames_per_second_ratio"] = ours["frames_per_second"] / results["reference"]["frames_per_second"]
            ours["peak_rss_ratio"] = ours["peak_rss_mb"] / peak
            ours["J&F_minus_reference"] = ours["toolkit"]["J&F-Mean"] - toolkit["J&F-Mean"]

    print(f"{'run':40s} {'J&F(toolkit)':>12s} {'J&F(reported)':>13s} {'frames/s':>9s} {'s/frame':>8s} {'peak MiB':>9s}")
    for variant, row in results.items():
        if isinstance(row, dict) and "toolkit" in row:
            reported = row.get("reported", {}).get("J&F-Mean")
            print(f"{variant:40s} {row['toolkit']['J&F-Mean']:12.2f} "
                  f"{(f'{reported:.2f}' if reported is not None else '-'):>13s} {row['frames_per_second']:9.3f} "
                  f"{row['seconds_per_frame']:8.3f} {row['peak_rss_mb']:9.0f}")
    (out / "benchmark.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    parser.add_argument("--model", help="hf_dino / transformers ViT folder")
    parser.add_argument("--reference_checkpoint", help="the same weights in the reference's format (.pth)")
    parser.add_argument("--data_path", default=str(HERE.parents[2] / "shared" / "data" / "davis"))
    parser.add_argument("--sequences", default=None, help="comma-separated; default: the image-set list")
    parser.add_argument("--max_frames", type=int, default=None, help="first N frames of each sequence only")
    parser.add_argument("--output_dir", default="/tmp/hf_dino_video_segmentation_benchmark")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch_size", type=int, default=8, help="hf_dino frames per forward pass")
    parser.add_argument("--n_last_frames", type=int, default=7)
    parser.add_argument("--size_mask_neighborhood", type=int, default=12)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--reference_quirks", action="store_true",
                        help="also run hf_dino with both reference quirks (std 0.228, +0.1 interpolation)")
    parser.add_argument("--each_quirk", action="store_true", help="also run hf_dino with each quirk alone")
    parser.add_argument("--skip_reference", action="store_true")
    parser.add_argument("--reference_python", default=DEFAULT_REFERENCE_PYTHON)
    parser.add_argument("--reference_root", default=DEFAULT_REFERENCE_ROOT)
    parser.add_argument("--toolkit_root", default=DEFAULT_TOOLKIT_ROOT)

    checkpoint = commands.add_parser("reference-checkpoint", help="write a reference-format ViT .pth")
    checkpoint.add_argument("--from_hf", default=None, help="map this transformers ViT folder back")
    checkpoint.add_argument("--arch", default="vit_small")
    checkpoint.add_argument("--patch_size", type=int, default=16)
    checkpoint.add_argument("--seed", type=int, default=0)
    checkpoint.add_argument("--reference_root", default=DEFAULT_REFERENCE_ROOT)
    checkpoint.add_argument("--output", required=True)

    run = commands.add_parser("reference-run", help="(reference venv) the reference's propagation")
    for name in ("--reference_root", "--checkpoint", "--data_path", "--output_dir", "--json"):
        run.add_argument(name, required=True)
    run.add_argument("--n_last_frames", type=int, default=7)
    run.add_argument("--size_mask_neighborhood", type=int, default=12)
    run.add_argument("--topk", type=int, default=5)

    score = commands.add_parser("toolkit-score", help="(reference venv) score a results folder with the toolkit")
    for name in ("--toolkit_root", "--davis_path", "--results_path", "--json"):
        score.add_argument(name, required=True)

    args = parser.parse_args()
    if args.command == "reference-checkpoint":
        reference_checkpoint(args)
    elif args.command == "reference-run":
        reference_run(args)
    elif args.command == "toolkit-score":
        toolkit_score(args)
    else:
        if not args.model or not (args.reference_checkpoint or args.skip_reference):
            parser.error("--model and --reference_checkpoint are required")
        benchmark(args)


if __name__ == "__main__":
    main()
