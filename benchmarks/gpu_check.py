#!/usr/bin/env python
"""The first GPU run of hf_dino, in one script of at most 8 minutes on one H100: ViT-S/16 training
step against facebookresearch/dino (a local checkout, imported from its path, never vendored) in
the same process, model FLOP utilisation, torch.compile on and off, the fp32 loss of both
implementations on the same weights and crops, and DataLoader throughput at ImageNet resolution.

    python benchmarks/gpu_check.py --reference_repo /path/to/dino --output_json gpu_check.json
    python benchmarks/gpu_check.py --dry_run --output_json /tmp/gpu_check.json   # CPU, tiny sizes, < 1 min
    python benchmarks/gpu_check.py --sections machine compile --output_json compile.json   # a rerun of one part

Sizes: ViT-S/16, paper head (3 layers 2048/256, K = 65,536), 2 global crops of 224 px and 10
local crops of 96 px per image, 64 images per step (--batch_size), hf_dino in bf16 autocast, the
reference in fp16 autocast with its GradScaler, as it ships (main_dino.py, --use_fp16 true).
`--dry_run` runs the same code on the CPU with a 2-block ViT-Tiny/8, 32 / 16 px crops, 0/1/2
DataLoader workers and torch.compile's `aot_eager` backend (tracing without code generation).

Each section runs in a fresh process (forked from a server that imported torch, transformers and
hf_dino once, and never touched the GPU) under a hard time limit; the JSON is rewritten after each
section, so a run cut short keeps what it measured, and a section that fails or runs out of time
records `error` and the run goes on. Per section on one H100: estimated time (not measured: no GPU
has run this script yet), and limit.
- machine (~20 s, limit 45 s): GPU, torch/CUDA/cuDNN, CPU; fp32 / bf16 / fp16 matmul peaks; FLOPs
  per image (counted on the CPU).
- loss (~35 s, limit 60 s): 3 fp32 steps (TF32 off) of hf_dino, of hf_dino with the reference's
  position-embedding interpolation, and of the reference, on the same weights and crops.
- throughput (~45 s, limit 90 s): hf_dino's bf16 step (eager) and the reference's fp16 step,
  timed interleaved for ~20 s.
- dataloader (~50 s, limit 75 s): hf_dino's MultiCropDataset on ~500x375 JPEGs with 4 / 8 / 16
  workers, ~10 s timed each.
- compile (~120 s, limit 180 s): hf_dino's bf16 step with torch.compile (inductor: most of the
  time is compilation) and without, timed interleaved for ~20 s.

Limits sum to 450 s (`--limit_scale` scales them); the script's own start-up adds ~10 s.
MFU = FLOPs per image (torch's FlopCounterMode on hf_dino's step: student forward + backward,
teacher forward; matmuls, convolutions, attention) x images/s, against the bf16 matmul peak
measured in the same run (`mfu`) and the GPU's nominal dense bf16 peak where known
(`mfu_nominal_peak`). On an H100 the fp16 and bf16 tensor-core peaks are equal; the reference's
fp16 MFU uses the bf16 peak too (its fp16 peak is in the JSON).
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import queue as queue_module
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import machine_description  # noqa: E402
from benchmarks.training_step import (BenchmarkSettings, _add_mfu, _child, _fork_context,  # noqa: E402
                                      _start_step_measurement, _step_recipe, _synchronize, build_hf_dino_step,
                                      build_reference_step, matmul_peak_flops, step_flops, synthetic_jpegs,
                                      time_interleaved)

SECTIONS = ("machine", "loss", "throughput", "dataloader", "compile")
SECTION_LIMITS_S = {"machine": 45, "loss": 60, "throughput": 90, "dataloader": 75, "compile": 180}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s; the first name
# contained in torch.cuda.get_device_name() applies.
NOMINAL_BF16_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
                           ("A100", 312e12))
MAX_TIMED_STEPS = 200
# Imported once by the server every section's process is forked from.
PRELOADED_MODULES = ["torch", "transformers", "datasets", "hf_dino.conversion", "hf_dino.data", "hf_dino.loss",
                     "hf_dino.optimization", "hf_dino.student_teacher", "hf_dino.transforms",
                     "benchmarks.training_step"]


@dataclass
class GpuCheckArguments:
    reference_repo: str | None = field(default=None, metadata={
        "help": "local checkout of facebookresearch/dino (its torchvision importable); unset: hf_dino alone"})
    reference_pythonpath: str | None = field(default=None, metadata={
        "help": "extra import path for the reference only (e.g. where its torchvision is installed)"})
    output_json: str = field(default="gpu_check.json", metadata={
        "help": "result JSON, rewritten after every section (also printed at the end)"})
    dry_run: bool = field(default=False, metadata={
        "help": "the same code with tiny sizes (ViT-Tiny/8 of 2 blocks, 32/16 px crops, 4 images per step, "
                "0/1/2 workers, aot_eager compile): under a minute on a CPU; overrides the size flags"})
    device: str | None = field(default=None, metadata={"help": "torch device; default: cuda, or cpu with --dry_run"})
    sections: list[str] = field(default_factory=lambda: list(SECTIONS), metadata={
        "help": "sections to run, in this script's order (machine always runs: MFU needs it)", "choices": SECTIONS})
    batch_size: int = field(default=64, metadata={"help": "images per training step (and per DataLoader batch)"})
    local_crops_number: int = field(default=10, metadata={"help": "96 px local crops per image"})
    warmup_steps: int = field(default=3, metadata={
        "help": "untimed steps of each implementation before timing (compilation happens here)"})
    timed_seconds: float = field(default=20.0, metadata={
        "help": "target length of each interleaved timing (throughput, compile); the step count follows from it"})
    min_timed_steps: int = field(default=5, metadata={"help": "timed steps of each implementation, at least"})
    loss_steps: int = field(default=3, metadata={"help": "fp32 steps of each implementation in the loss check"})
    loader_workers: list[int] = field(default_factory=lambda: [4, 8, 16], metadata={
        "help": "DataLoader worker counts to time (each capped by os.cpu_count())"})
    loader_seconds: float = field(default=10.0, metadata={"help": "timed seconds per worker count"})
    loader_images: int = field(default=256, metadata={"help": "distinct JPEGs in the DataLoader's dataset"})
    image_short_side: int = field(default=375, metadata={
        "help": "short side of the DataLoader's JPEGs, px (ImageNet's most common size is 500x375)"})
    compile_backend: str | None = field(default=None, metadata={
        "help": "torch.compile backend; default: inductor, or aot_eager with --dry_run"})
    limit_scale: float = field(default=1.0, metadata={"help": "multiplies every section's time limit"})

    def __post_init__(self) -> None:
        for name in ("batch_size", "warmup_steps", "min_timed_steps", "loss_steps", "loader_images",
                     "image_short_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= 1")
        if any(workers < 0 for workers in self.loader_workers):
            raise ValueError(f"--loader_workers {self.loader_workers}: must be >= 0")
        if self.limit_scale <= 0:
            raise ValueError(f"--limit_scale {self.limit_scale}: must be > 0")


DRY_RUN = dict(device="cpu", batch_size=4, local_crops_number=2, warmup_steps=1, timed_seconds=0.3, min_timed_steps=3,
               loss_steps=2, loader_workers=[0, 1, 2], loader_seconds=0.5, loader_images=8, image_short_side=64,
               compile_backend="aot_eager")


def benchmark_settings(arguments: GpuCheckArguments) -> BenchmarkSettings:
    """The training-step sizes: ViT-S/16 with the paper's head and crops, or the dry run's tiny ViT."""
    sizes = (dict(arch="vit_tiny", num_hidden_layers=2, patch_size=8, global_crop_size=32, local_crop_size=16,
                  out_dim=256, threads=1) if arguments.dry_run else
             dict(arch="vit_small", patch_size=16, global_crop_size=224, local_crop_size=96, out_dim=65536))
    return BenchmarkSettings(**sizes, batch_size=arguments.batch_size, local_crops_number=arguments.local_crops_number,
                             mixed_precision="bf16", reference_mixed_precision="fp16",
                             warmup_steps=arguments.warmup_steps, timed_steps=arguments.min_timed_steps,
                             keep_freed_cpu_memory=False)  # this script measures no CPU memory


# ---------------------------------------------------------------- sections (each in its own process)
def check_machine(settings: BenchmarkSettings, device: str) -> dict:
    """GPU and CPU description, matmul peaks (FLOP/s) of fp32 (TF32 off), bf16 and fp16 on `device`,
    and the FLOPs per image of one training step, counted on the CPU at batch 1 in fp32 (the count
    depends neither on the batch nor on the precision)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    machine = {"cpu": machine_description(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    # On a GPU, matmul_peak_flops's size probe (one matmul of side 256) times a kernel launch once
    # cuBLAS has started: a generous bound keeps the side at 8192 (~1.5 ms in bf16 on an H100)
    peak_sizes = dict(size=8192, repeats=10, max_seconds=10.0) if device == "cuda" else dict(size=512, repeats=3)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 peak is fp32's (torch's default)
        for dtype in dtypes.values():  # cuBLAS's start-up, outside the probe
            torch.ones(256, 256, device=device, dtype=dtype).matmul(torch.ones(256, 256, device=device, dtype=dtype))
        torch.cuda.synchronize()
        properties = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name()
        machine.update(gpu=name, gpu_memory_gib=properties.total_memory / 2 ** 30,
                       multiprocessors=properties.multi_processor_count,
                       capability=list(torch.cuda.get_device_capability()), cuda=torch.version.cuda,
                       cudnn=torch.backends.cudnn.version())
        machine["nominal_bf16_peak_flops"] = next((peak for key, peak in NOMINAL_BF16_PEAK_FLOPS if key in name), None)
    peaks = {name: matmul_peak_flops(dtype, device, **peak_sizes) for name, dtype in dtypes.items()}
    counted = dataclasses.replace(settings, batch_size=1, mixed_precision="no", torch_compile=False)
    return {"machine": machine, "matmul_peak_flops": peaks, "flops_per_image": step_flops(counted, "cpu")}


def hf_dino_state_in_reference_layout(model: torch.nn.Module) -> dict:
    """An hf_dino `DinoModel`'s state dict (ViT backbone + head) under the reference's
    MultiCropWrapper names (`backbone.blocks.0.attn.qkv.weight`, `head.last_layer.weight_g`, ...)."""
    from hf_dino.conversion import HEAD_KEYS, reference_vit_state_dict, strip_prefixes, transformers_to_reference

    backbone, head = strip_prefixes(model.state_dict())
    head, unknown = transformers_to_reference(head, HEAD_KEYS)
    if unknown:
        raise ValueError(f"head keys without a reference counterpart: {unknown}")
    return ({f"backbone.{key}": tensor for key, tensor in reference_vit_state_dict(backbone).items()}
            | {f"head.{key}": tensor for key, tensor in head.items()})


def _max_abs_difference(hf_dino_model: torch.nn.Module, reference_model: torch.nn.Module) -> float:
    reference_state = reference_model.state_dict()
    return max((tensor - reference_state[key]).abs().max().item()
               for key, tensor in hf_dino_state_in_reference_layout(hf_dino_model).items())


def check_fp32_loss(settings: BenchmarkSettings, device: str, reference_repo: str | None, steps: int) -> dict:
    """`steps` fp32 training steps of hf_dino and, given the reference, of the reference with
    hf_dino's initial student and teacher weights copied into its MultiCropWrappers, on the same
    crops, all with a zero centre and teacher temperature 0.04; TF32 off. The networks are in eval
    mode: the only train/eval difference in them is stochastic depth, whose random masks the
    implementations draw differently.

    The implementations differ by design in one computation: the position embeddings of crops
    smaller than the global ones (hf_dino resizes the grid to the exact size, the reference scales
    it by (n + 0.1) / g). So, with a reference, a third run, `hf_dino_reference_interpolation`, is
    hf_dino's step (same weights) with the reference's interpolation: it should equal the
    reference to float rounding, and `hf_dino` shows what the interpolation changes.

    Returns `losses` {name: each step's loss, computed before that step's update},
    `relative_difference` {name: |loss - reference| / |reference| per step} and the largest
    weight differences to the reference after the steps."""
    import contextlib

    from hf_dino.conversion import load_strict
    from hf_dino.evaluation.video_segmentation import reference_pos_interpolation

    settings = dataclasses.replace(settings, mixed_precision="no", reference_mixed_precision="no", torch_compile=False)
    _start_step_measurement(settings)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ours = build_hf_dino_step(settings, device)
    implementations = {"hf_dino": ours}
    with contextlib.ExitStack() as patches:
        if reference_repo:
            interpolated = build_hf_dino_step(settings, device)
            reference = build_reference_step(settings, device, reference_repo)
            for name in ("student", "teacher"):
                getattr(interpolated, name).load_state_dict(getattr(ours, name).state_dict())
                patches.enter_context(reference_pos_interpolation(getattr(interpolated, name).backbone))
                load_strict(getattr(reference, name), hf_dino_state_in_reference_layout(getattr(ours, name)),
                            f"hf_dino's {name} in the reference's layout")
            implementations.update(hf_dino_reference_interpolation=interpolated, reference=reference)
        for step in implementations.values():
            step.student.eval()
            step.teacher.eval()
        losses = {name: [] for name in implementations}
        for _ in range(steps):
            for name, step in implementations.items():
                losses[name].append(step().item())
    result = {"settings": asdict(settings), "teacher_temperature": _step_recipe(settings).warmup_teacher_temp,
              "losses": losses}
    if reference_repo:
        result["relative_difference"] = {
            name: [abs(loss - reference_loss) / abs(reference_loss)
                   for loss, reference_loss in zip(losses[name], losses["reference"])]
            for name in ("hf_dino", "hf_dino_reference_interpolation")}
        result["max_abs_weight_difference"] = {
            f"{name}_{network}": _max_abs_difference(getattr(implementations[name], network),
                                                     getattr(reference, network))
            for name in ("hf_dino", "hf_dino_reference_interpolation") for network in ("student", "teacher")}
    return result


def time_steps(steps: dict, precisions: dict, settings: BenchmarkSettings, device: str, timed_seconds: float) -> dict:
    """Warm up each step closure in turn (its compilation timed here), then time them interleaved
    (`time_interleaved`) for about `timed_seconds`, at least `settings.timed_steps` steps each.
    Returns per name: median images/s, step seconds (median, min), warm-up seconds, timed steps,
    its precision and the loss of one more step; `ratios`: "first/other", the median over rounds
    of the other's step time over the first's (the first's images/s relative to the other's; > 1:
    the first is faster); and the process's peak GPU memory (all of them together)."""
    warmup = {}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(settings.warmup_steps):
            step()
        _synchronize(device)
        warmup[name] = time.perf_counter() - start
    round_seconds = sum(seconds[0] for seconds in time_interleaved(steps, 0, 1, device).values())
    rounds = max(settings.timed_steps, min(MAX_TIMED_STEPS, int(timed_seconds / round_seconds)))
    seconds = time_interleaved(steps, 0, rounds, device)
    result = {name: {"train_img_per_s": settings.batch_size / statistics.median(seconds[name]),
                     "step_s_median": statistics.median(seconds[name]), "step_s_min": min(seconds[name]),
                     "warmup_steps_s": warmup[name], "timed_steps": rounds, "precision": precisions[name],
                     "loss_after": step().item()} for name, step in steps.items()}
    first, *others = steps
    result["ratios"] = {f"{first}/{other}": statistics.median(b / a for a, b in zip(seconds[first], seconds[other]))
                        for other in others}
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return result


def check_throughput(settings: BenchmarkSettings, device: str, reference_repo: str | None,
                     timed_seconds: float) -> dict:
    """hf_dino's bf16 step (eager) and, given the reference, its fp16 + GradScaler step, both
    built in this process and timed interleaved."""
    _start_step_measurement(settings)
    steps = {"hf_dino": build_hf_dino_step(settings, device)}
    precisions = {"hf_dino": settings.mixed_precision}
    if reference_repo:
        steps["reference"] = build_reference_step(settings, device, reference_repo)
        precisions["reference"] = settings.reference_precision
    return time_steps(steps, precisions, settings, device, timed_seconds)


def check_compile(settings: BenchmarkSettings, device: str, backend: str, timed_seconds: float) -> dict:
    """hf_dino's bf16 step with torch.compile (`backend`) and without, timed interleaved; the
    compiled step's warm-up holds its compilation."""
    _start_step_measurement(settings)
    steps = {"compiled": build_hf_dino_step(dataclasses.replace(settings, torch_compile=True), device, backend),
             "eager": build_hf_dino_step(settings, device)}
    result = time_steps(steps, dict.fromkeys(steps, settings.mixed_precision), settings, device, timed_seconds)
    result["backend"] = backend
    return result


def check_dataloader(settings: BenchmarkSettings, worker_counts: list[int], seconds: float, num_images: int,
                     short_side: int, pin_memory: bool) -> dict:
    """Images/s of hf_dino's training input pipeline: `num_images` JPEGs (`short_side` px on their
    short side) in a 🤗 dataset, decoded and multi-cropped by `MultiCropDataset` (the recipe's
    augmentation at the settings' crop sizes), batched by `collate_multicrop` as the trainer's
    DataLoader does (prefetch 4, pinned memory on a GPU), sampled with replacement so the stream
    never ends. Per worker count: the first batch of every worker is start-up, then images are
    counted for `seconds`."""
    import datasets
    import PIL.Image

    from hf_dino.data import MultiCropDataset, collate_multicrop
    from hf_dino.transforms import MultiCropAugmentation

    jpegs = synthetic_jpegs(dataclasses.replace(settings, num_images=num_images), short_side)
    table = datasets.Dataset.from_dict({"image": [{"bytes": jpeg, "path": None} for jpeg in jpegs]},
                                       features=datasets.Features({"image": datasets.Image()}))
    recipe = _step_recipe(settings)
    augmentation = MultiCropAugmentation(global_crop_size=recipe.global_crop_size,
                                         local_crop_size=recipe.local_crop_size,
                                         local_crops_number=recipe.local_crops_number,
                                         params=recipe.augmentation_params())
    dataset = MultiCropDataset(table, augmentation, "image", seed=settings.seed)
    sizes = [PIL.Image.open(io.BytesIO(jpeg)).size for jpeg in jpegs]
    result = {"mean_image_size": [statistics.mean(width for width, _ in sizes),
                                  statistics.mean(height for _, height in sizes)],
              "views": [recipe.global_crop_size] * 2 + [recipe.local_crop_size] * recipe.local_crops_number,
              "batch_size": settings.batch_size, "workers": {}}
    for workers in worker_counts:
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=2 ** 40,
                                                 generator=torch.Generator().manual_seed(settings.seed))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=settings.batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_multicrop,
            pin_memory=pin_memory, drop_last=True, prefetch_factor=4 if workers else None,
            multiprocessing_context=_fork_context() if workers else None)
        start = time.perf_counter()
        batches = iter(loader)
        for _ in range(max(workers, 1)):
            next(batches)
        startup = time.perf_counter() - start
        images, start = 0, time.perf_counter()
        while images == 0 or time.perf_counter() - start < seconds:
            images += len(next(batches)["crops"][0])
        elapsed = time.perf_counter() - start
        del batches  # stops the workers
        result["workers"][str(workers)] = {"img_per_s": images / elapsed, "images": images, "seconds": elapsed,
                                           "startup_s": startup}
    return result


# ---------------------------------------------------------------- orchestration
def _section_context():
    """Sections start from a fork server that imported the heavy modules once (and never
    initialised CUDA), so each starts in a fraction of a second; spawn where fork is unavailable."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED_MODULES)
    return context


def run_section(context, function, args: tuple, limit_s: float) -> dict:
    """`function(*args)` in a fresh process, killed after `limit_s` seconds; its result dict with
    `wall_s` and `limit_s`, or {"error": ...} when it raised, died or ran out of time."""
    results = context.Queue()
    process = context.Process(target=_child, args=(results, function, args))
    start = time.perf_counter()
    process.start()
    ok, value = False, None
    while value is None:
        try:
            ok, value = results.get(timeout=1.0)
        except queue_module.Empty:
            if not process.is_alive():
                try:
                    ok, value = results.get(timeout=1.0)
                except queue_module.Empty:
                    value = f"its process exited with code {process.exitcode} before reporting"
            elif time.perf_counter() - start > limit_s:
                process.kill()
                value = f"stopped at its limit of {limit_s:.0f} s"
    process.join(timeout=30)
    if process.is_alive():
        process.kill()
        process.join()
    section = dict(value) if ok else {"error": value}
    section.update(wall_s=time.perf_counter() - start, limit_s=limit_s)
    return section


def add_mfu(section: dict, machine: dict) -> None:
    """Model FLOP utilisation of every timed implementation of a section (`_add_mfu`: against the
    measured matmul peaks) and against the GPU's nominal dense bf16 peak where known."""
    nominal = machine["machine"].get("nominal_bf16_peak_flops")
    for values in section.values():
        if isinstance(values, dict) and "train_img_per_s" in values:
            _add_mfu(values, machine["flops_per_image"], machine["matmul_peak_flops"], values["precision"])
            values["mfu_nominal_peak"] = values["achieved_flops"] / nominal if nominal else None


def _save(result: dict, path: str) -> None:
    """Write the JSON atomically, so that a run killed mid-write leaves the previous version."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temporary = f"{path}.partial"
    with open(temporary, "w") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> None:
    from hf_dino.cli import parse_args, usage_error

    (arguments,) = parse_args(GpuCheckArguments, argv=argv, description=__doc__)
    if arguments.dry_run:
        arguments = dataclasses.replace(arguments, **{key: value for key, value in DRY_RUN.items()
                                                      if key not in ("device", "compile_backend")
                                                      or getattr(arguments, key) is None})
    device = arguments.device or "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        usage_error("--device cuda: no GPU is visible; use --dry_run (CPU, tiny sizes) or --device cpu")
    reference_repo = arguments.reference_repo
    if reference_repo and arguments.reference_pythonpath:
        reference_repo = os.pathsep.join([reference_repo, arguments.reference_pythonpath])
    settings = benchmark_settings(arguments)
    worker_counts = sorted({min(workers, os.cpu_count() or 1) for workers in arguments.loader_workers})
    sections = {
        "machine": (check_machine, (settings, device)),
        "loss": (check_fp32_loss, (settings, device, reference_repo, arguments.loss_steps)),
        "throughput": (check_throughput, (settings, device, reference_repo, arguments.timed_seconds)),
        "dataloader": (check_dataloader, (settings, worker_counts, arguments.loader_seconds, arguments.loader_images,
                                          arguments.image_short_side, device == "cuda")),
        "compile": (check_compile, (settings, device, arguments.compile_backend or "inductor",
                                    arguments.timed_seconds)),
    }
    result = {"arguments": asdict(arguments), "device": device, "reference": bool(reference_repo),
              "settings": asdict(settings), "wall_s": 0.0}
    context, start = _section_context(), time.perf_counter()
    for name in SECTIONS:
        if name != "machine" and name not in arguments.sections:
            continue
        function, args = sections[name]
        result[name] = run_section(context, function, args, SECTION_LIMITS_S[name] * arguments.limit_scale)
        if name in ("throughput", "compile") and "error" not in result[name] and "error" not in result["machine"]:
            add_mfu(result[name], result["machine"])
        result["wall_s"] = time.perf_counter() - start
        _save(result, arguments.output_json)
    print(json.dumps(result, indent=2))
    failed = [name for name in SECTIONS if "error" in result.get(name, {})]
    if failed:
        sys.stderr.write(f"sections with errors: {', '.join(failed)} (see {arguments.output_json})\n")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
