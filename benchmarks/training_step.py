"""Throughput and memory of hf_dino's training step and multi-crop augmentation, optionally against
facebookresearch/dino (a local checkout, imported from its path, never vendored) in the same run.

Each measurement runs in a fresh subprocess (spawn), so that peak memory belongs to that
measurement alone and one implementation's threads or caches cannot slow the other. On CPU,
peak memory is the subprocess's peak RSS minus its RSS just before the models were built
(imports and input data excluded); on a GPU it is `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class BenchmarkSettings:
    arch: str = field(default="vit_small", metadata={"help": "backbone", "choices": ["vit_tiny", "vit_small", "vit_base"]})
    patch_size: int = field(default=16, metadata={"help": "ViT patch size"})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "ViT depth; unset: the preset's (12)"})
    batch_size: int = field(default=8, metadata={"help": "images per step"})
    local_crops_number: int = field(default=6, metadata={"help": "local crops per image"})
    global_crop_size: int = field(default=224, metadata={"help": "side of the 2 global crops"})
    local_crop_size: int = field(default=96, metadata={"help": "side of the local crops"})
    out_dim: int = field(default=65536, metadata={"help": "K, the head's outputs"})
    mixed_precision: str = field(default="no", metadata={"help": "hf_dino's precision", "choices": ["no", "bf16", "fp16"]})
    reference_mixed_precision: str | None = field(default=None, metadata={
        "help": "the reference's precision; unset: the same as hf_dino's", "choices": ["no", "bf16", "fp16"]})
    attn_implementation: str = field(default="auto", metadata={
        "help": "hf_dino's ViT attention kernel (DinoRecipe.attn_implementation)", "choices": ["auto", "sdpa", "eager"]})
    torch_compile: bool = field(default=False, metadata={"help": "hf_dino's forwards compiled (DinoRecipe.torch_compile)"})
    warmup_steps: int = field(default=2, metadata={"help": "untimed steps first"})
    timed_steps: int = field(default=5, metadata={"help": "timed steps"})
    num_images: int = field(default=64, metadata={"help": "augmentation benchmark: JPEG-encoded images of ~256 px"})
    num_workers: int = field(default=2, metadata={"help": "augmentation benchmark: DataLoader workers"})
    threads: int | None = field(default=None, metadata={"help": "torch threads per measurement; unset: all cores"})
    keep_freed_cpu_memory: bool = field(default=True, metadata={
        "help": "CPU: glibc malloc keeps freed memory in every step measurement's process, the reference's too"})
    seed: int = field(default=0, metadata={"help": "seed of weights and data"})

    @property
    def reference_precision(self) -> str:
        return self.reference_mixed_precision or self.mixed_precision


# ---------------------------------------------------------------- machine peak
def matmul_peak_flops(dtype: torch.dtype, device: str = "cpu", size: int = 2048, repeats: int = 5,
                      max_seconds: float = 0.5) -> float:
    """Best achieved FLOP/s of a square matmul: the reference point of model FLOP utilisation.
    The side shrinks (by halves, down to 256) while one matmul would take over `max_seconds`,
    so that an emulated dtype (bf16 without hardware support) does not stall the benchmark."""
    while size > 256:
        probe = torch.randn(256, 256, device=device, dtype=dtype)
        _synchronize(device)
        start = time.perf_counter()
        torch.matmul(probe, probe)
        _synchronize(device)
        if (time.perf_counter() - start) * (size / 256) ** 3 <= max_seconds:
            break
        size //= 2
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = math.inf
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _crops(settings: BenchmarkSettings, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(settings.seed)
    sizes = [settings.global_crop_size] * 2 + [settings.local_crop_size] * settings.local_crops_number
    return [torch.randn(settings.batch_size, 3, s, s, generator=generator).to(device) for s in sizes]


def _autocast(mixed_precision: str, device: str):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


# ---------------------------------------------------------------- hf_dino step
def _step_recipe(settings: BenchmarkSettings):
    """The recipe both implementations' benchmarked steps are built from: the paper's defaults
    (drop-path 0.1, 3-layer head 2048/256, normalised last layer) at the benchmark's sizes."""
    from hf_dino.recipe import DinoRecipe

    return DinoRecipe(arch=settings.arch, patch_size=settings.patch_size, num_hidden_layers=settings.num_hidden_layers,
                      global_crop_size=settings.global_crop_size, local_crop_size=settings.local_crop_size,
                      local_crops_number=settings.local_crops_number, out_dim=settings.out_dim)


def build_hf_dino_step(settings: BenchmarkSettings, device: str, compile_backend: str = "inductor"):
    """One hf_dino optimizer step (teacher + student forward, loss, backward, clip, AdamW, EMA,
    centre) as a closure over pre-made crops; `step.student` and `step.teacher` are its (uncompiled)
    networks. `compile_backend`: torch.compile's backend when `settings.torch_compile`."""
    from hf_dino.loss import DinoLoss
    from hf_dino.modeling_dino import training_attention_implementation
    from hf_dino.optimization import build_optimizer, clip_gradients_per_parameter, ema_update
    from hf_dino.student_teacher import build_student_and_teacher

    recipe = _step_recipe(settings)
    attention = training_attention_implementation(settings.attn_implementation, device, settings.mixed_precision)
    student, teacher = build_student_and_teacher(recipe, attention)
    student.to(device).train()
    teacher.to(device).train()
    loss_fn = DinoLoss(recipe.out_dim, num_teacher_views=2, student_temperature=recipe.student_temp).to(device)
    optimizer = build_optimizer(student, recipe.optimizer)
    for group in optimizer.param_groups:
        group["lr"] = 1e-5
    scaler = torch.amp.GradScaler(device) if settings.mixed_precision == "fp16" else None
    student_parameters, teacher_parameters = list(student.parameters()), list(teacher.parameters())
    trainable = [p for p in student_parameters if p.requires_grad]
    crops = _crops(settings, device)
    student_forward, teacher_forward = ((torch.compile(student, backend=compile_backend),
                                         torch.compile(teacher, backend=compile_backend)) if settings.torch_compile
                                        else (student, teacher))

    def step() -> torch.Tensor:
        with torch.no_grad(), _autocast(settings.mixed_precision, device):
            teacher_logits = teacher_forward(crops[:2]).logits
        with _autocast(settings.mixed_precision, device):
            student_logits = student_forward(crops).logits
        loss = loss_fn(student_logits, teacher_logits, recipe.warmup_teacher_temp).loss  # fp32 inside
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        clip_gradients_per_parameter(trainable, recipe.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(teacher_parameters, student_parameters, 0.996)
        loss_fn.accumulate_center(teacher_logits)
        loss_fn.update_center()
        return loss.detach()  # no host sync: the caller synchronises once per timing window

    step.student, step.teacher = student, teacher
    return step


# ---------------------------------------------------------------- reference step
def import_reference(reference_repo: str):
    """Import the reference's modules from a local checkout (`vision_transformer`, `utils`,
    `main_dino`; they need torchvision). `reference_repo` may list further import paths after
    the checkout, separated by os.pathsep, e.g. a `pip install --target DIR torchvision` kept
    apart from the environment hf_dino runs in. torchvision's compiled operators are not used by
    the reference; where its C extension does not match the installed torch, the two operator
    schemas its import registers are declared first so that the pure-Python transforms load."""
    for path in reversed(reference_repo.split(os.pathsep)):
        sys.path.insert(0, os.path.abspath(path))
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        for name in list(sys.modules):
            if name.startswith("torchvision"):
                del sys.modules[name]
        library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_reference.library = library  # keep the definitions alive
    import main_dino
    import utils
    import vision_transformer

    return vision_transformer, utils, main_dino


def _single_process_group() -> None:
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():  # the reference's loss all-reduces the centre
        with socket.socket() as handle:
            handle.bind(("127.0.0.1", 0))
            port = handle.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def reference_student_and_teacher(vits, utils, recipe):
    """The reference's `MultiCropWrapper(VisionTransformer, DINOHead)` student and teacher for a
    `DinoRecipe` (ViT presets of hf_dino, settable depth): teacher without drop-path, a copy of the
    student's weights, no gradients."""
    from functools import partial

    from hf_dino.configuration_dino import VIT_LAYER_NORM_EPS, VIT_MLP_RATIO, VIT_PRESETS

    if recipe.arch not in VIT_PRESETS:
        raise ValueError("the reference comparison covers ViTs")
    dims = VIT_PRESETS[recipe.arch]

    def network(drop_path_rate: float, norm_last_layer: bool):
        backbone = vits.VisionTransformer(
            img_size=[recipe.global_crop_size], patch_size=recipe.patch_size, embed_dim=dims["hidden_size"],
            depth=recipe.num_hidden_layers or dims["num_hidden_layers"], num_heads=dims["num_attention_heads"],
            mlp_ratio=VIT_MLP_RATIO, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=VIT_LAYER_NORM_EPS),
            drop_path_rate=drop_path_rate)
        head = vits.DINOHead(dims["hidden_size"], recipe.out_dim, use_bn=recipe.use_bn_in_head,
                             norm_last_layer=norm_last_layer, nlayers=recipe.head_num_layers,
                             hidden_dim=recipe.head_hidden_dim, bottleneck_dim=recipe.head_bottleneck_dim)
        return utils.MultiCropWrapper(backbone, head)

    student, teacher = network(recipe.drop_path_rate, recipe.norm_last_layer), network(0.0, True)
    teacher.load_state_dict(student.state_dict())
    for parameter in teacher.parameters():
        parameter.requires_grad = False
    return student, teacher


def build_reference_step(settings: BenchmarkSettings, device: str, reference_repo: str):
    """The reference's training iteration (main_dino.train_one_epoch) on pre-made crops: its
    MultiCropWrapper(ViT, DINOHead), DINOLoss, get_params_groups + AdamW, clip_gradients,
    cancel_gradients_last_layer, the per-parameter EMA loop and the per-step `loss.item()`;
    `step.student` and `step.teacher` are its MultiCropWrapper networks."""
    vits, utils, main_dino = import_reference(reference_repo)
    _single_process_group()
    student, teacher = reference_student_and_teacher(vits, utils, _step_recipe(settings))
    student.to(device).train()
    teacher.to(device).train()
    loss_fn = main_dino.DINOLoss(settings.out_dim, settings.local_crops_number + 2, 0.04, 0.04, 0, 100).to(device)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student), lr=1e-5)
    scaler = torch.amp.GradScaler(device) if settings.reference_precision == "fp16" else None
    crops = _crops(settings, device)

    def step() -> torch.Tensor:
        with _autocast(settings.reference_precision, device):
            teacher_output = teacher(crops[:2])
            student_output = student(crops)
            loss = loss_fn(student_output, teacher_output, 0)
        loss.item()  # the reference checks finiteness every step (a host sync)
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            utils.clip_gradients(student, 3.0)
            utils.cancel_gradients_last_layer(1, student, 1)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            utils.clip_gradients(student, 3.0)
            utils.cancel_gradients_last_layer(1, student, 1)
            scaler.step(optimizer)
            scaler.update()
        with torch.no_grad():
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(0.996).add_((1 - 0.996) * param_q.detach().data)
        return loss.detach()

    step.student, step.teacher = student, teacher
    return step


# ---------------------------------------------------------------- measurements
def _time_steps(step, settings: BenchmarkSettings, device: str) -> tuple[float, float]:
    """(images/s of the timed steps, seconds of the warm-up steps: compilation included)."""
    start = time.perf_counter()
    for _ in range(settings.warmup_steps):
        step()
    _synchronize(device)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    losses = [step() for _ in range(settings.timed_steps)]
    torch.stack(losses).sum().item()
    _synchronize(device)
    return settings.batch_size * settings.timed_steps / (time.perf_counter() - start), warmup_seconds


def step_flops(settings: BenchmarkSettings, device: str) -> float:
    """FLOPs of one hf_dino training step per image (student fwd+bwd, teacher fwd), counted by
    torch's FlopCounterMode (matmuls, convolutions and attention)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    # torch's counter knows the CUDA attention kernels but not the CPU one SDPA dispatches to here
    # (formulas receive shapes)
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: (
            lambda query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(query, key, value)),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(
                grad_out, query, key, value)),
    }
    step = build_hf_dino_step(dataclasses.replace(settings, torch_compile=False), device)  # same FLOPs, countable
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter:
        step()
    return counter.get_total_flops() / settings.batch_size


def _start_step_measurement(settings: BenchmarkSettings) -> str:
    """Seed and thread count of a step measurement's (fresh) process; returns its device."""
    torch.manual_seed(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and settings.keep_freed_cpu_memory:
        from hf_dino.cpu_runtime import keep_freed_cpu_memory

        keep_freed_cpu_memory()
    return device


def measure_training(implementation: str, settings: BenchmarkSettings, reference_repo: str | None) -> dict:
    """Run in a subprocess: training-step images/s and peak memory of one implementation."""
    device = _start_step_measurement(settings)
    baseline = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = (build_hf_dino_step(settings, device) if implementation == "hf_dino"
            else build_reference_step(settings, device, reference_repo))
    img_per_s, warmup_seconds = _time_steps(step, settings, device)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else _peak_rss_mb() - baseline)
    return {"train_img_per_s": img_per_s, "peak_memory_mb": peak, "warmup_steps_s": warmup_seconds}


def time_interleaved(steps: dict, warmup_steps: int, timed_steps: int, device: str = "cpu") -> dict:
    """Seconds per step of several step closures timed alternately, one step each in turn, the
    order reversed every round (A B, B A, ...), so that all see the same machine conditions.
    Returns {name: [seconds of each timed step]}; on a shared machine whose speed drifts, ratios
    of these paired times are steadier than best-of-runs in separate processes."""
    names = list(steps)
    for _ in range(warmup_steps):
        for name in names:
            steps[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(timed_steps):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            _synchronize(device)
            start = time.perf_counter()
            steps[name]()
            _synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def measure_training_interleaved(settings: BenchmarkSettings, reference_repo: str) -> dict:
    """Run in a subprocess: both implementations' steps built in one process and timed
    alternately (`time_interleaved`). Returns the median images/s of each and the median of the
    per-round ratios (hf_dino / reference)."""
    device = _start_step_measurement(settings)
    steps = {"hf_dino": build_hf_dino_step(settings, device),
             "reference": build_reference_step(settings, device, reference_repo)}
    seconds = time_interleaved(steps, settings.warmup_steps, settings.timed_steps, device)
    ratios = [reference / ours for ours, reference in zip(seconds["hf_dino"], seconds["reference"])]
    return {"hf_dino_train_img_per_s": settings.batch_size / statistics.median(seconds["hf_dino"]),
            "reference_train_img_per_s": settings.batch_size / statistics.median(seconds["reference"]),
            "train_img_per_s_ratio": statistics.median(ratios), "train_img_per_s_ratios": ratios}


def synthetic_jpegs(settings: BenchmarkSettings, short_side: int = 256) -> list[bytes]:
    """`settings.num_images` JPEG photographs resized to `short_side` px on their short side
    (scikit-image's samples when installed, else smooth random images)."""
    from PIL import Image

    rng = np.random.default_rng(settings.seed)
    photos = []
    try:
        from skimage import data as samples

        photos = [samples.astronaut(), samples.chelsea(), samples.coffee(), samples.rocket()]
    except ImportError:
        pass
    images = []
    for index in range(settings.num_images):
        if photos:
            array = photos[index % len(photos)]
        else:
            array = (np.cumsum(rng.random((64, 64, 3)), axis=0) % 1 * 255).astype(np.uint8)
        image = Image.fromarray(array).convert("RGB")
        scale = short_side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


class _JpegCrops(torch.utils.data.Dataset):
    """Decode a JPEG and multi-crop it, with hf_dino's or the reference's augmentation."""

    def __init__(self, jpegs: list[bytes], implementation: str, settings: BenchmarkSettings, reference_repo):
        self.jpegs, self.implementation, self.settings, self.reference_repo = jpegs, implementation, settings, reference_repo
        self.augmentation = None

    def _build(self):
        s = self.settings
        if self.implementation == "hf_dino":
            from hf_dino.transforms import MultiCropAugmentation

            return MultiCropAugmentation(global_crop_size=s.global_crop_size, local_crop_size=s.local_crop_size,
                                         local_crops_number=s.local_crops_number)
        _, _, main_dino = import_reference(self.reference_repo)
        return main_dino.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), s.local_crops_number)

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, index: int):
        from PIL import Image

        if self.augmentation is None:
            self.augmentation = self._build()
        if self.implementation == "hf_dino":
            from hf_dino.data import decode_image

            return self.augmentation(decode_image(self.jpegs[index]), seed=index)
        return self.augmentation(Image.open(io.BytesIO(self.jpegs[index])).convert("RGB"))


def measure_augmentation(implementation: str, settings: BenchmarkSettings, reference_repo: str | None) -> dict:
    """Run in a subprocess: multi-crop images/s in this process, and with `num_workers` workers."""
    if implementation == "reference" and (settings.global_crop_size, settings.local_crop_size) != (224, 96):
        return {}  # the reference's DataAugmentationDINO is fixed at 224 / 96 px
    torch.set_num_threads(1)
    dataset = _JpegCrops(synthetic_jpegs(settings), implementation, settings, reference_repo)
    dataset[0]
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    single = len(dataset) / (time.perf_counter() - start)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=settings.num_workers,
                                         collate_fn=len, persistent_workers=True, multiprocessing_context=_fork_context())
    sum(loader)  # workers started and warm
    start = time.perf_counter()
    count = sum(loader)
    workers = count / (time.perf_counter() - start)
    return {"augment_img_per_s": single, f"augment_img_per_s_{settings.num_workers}_workers": workers}


def _fork_context():
    """DataLoader workers forked, not started with the spawn method this subprocess inherits:
    spawned workers would re-import the script with the reference's import paths already added."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)


def _child(queue, function, args) -> None:
    try:
        queue.put((True, function(*args)))
    except BaseException as error:  # report, the parent re-raises
        import traceback

        queue.put((False, f"{error!r}\n{traceback.format_exc()}"))


def _run_isolated(function, *args):
    """`function(*args)` in a fresh (spawned, non-daemonic: it may start DataLoader workers) process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, args))
    process.start()
    ok, value = queue.get()
    process.join()
    if not ok:
        raise RuntimeError(f"{function.__name__} failed in its subprocess:\n{value}")
    return value


def run_benchmark(settings: BenchmarkSettings, reference_repo: str | None = None, rounds: int = 1) -> dict:
    """Every measurement for hf_dino (and the reference), alternating implementations for
    `rounds` rounds and keeping each one's best; ratios are hf_dino / reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    implementations = ["hf_dino"] + (["reference"] if reference_repo else [])
    measured: dict[str, dict] = {name: {} for name in implementations}
    for _ in range(rounds):
        for name in implementations:
            for function in (measure_training, measure_augmentation):
                values = _run_isolated(function, name, settings, reference_repo)
                for key, value in values.items():
                    best = min if key in ("peak_memory_mb", "warmup_steps_s") else max
                    measured[name][key] = best(value, measured[name].get(key, value))
    flops_per_image = _run_isolated(step_flops, settings, device)
    peaks = {"fp32": matmul_peak_flops(torch.float32, device)}
    peaks["bf16"] = matmul_peak_flops(torch.bfloat16, device)
    result = dict(measured["hf_dino"])
    result.update(settings=asdict(settings), device=(torch.cuda.get_device_name() if device == "cuda"
                                                     else f"CPU, {torch.get_num_threads()} threads"),
                  flops_per_image=flops_per_image, matmul_peak_flops=peaks)
    _add_mfu(result, flops_per_image, peaks, settings.mixed_precision)
    if reference_repo:
        reference = measured["reference"]
        _add_mfu(reference, flops_per_image, peaks, settings.reference_precision)  # same architecture and crops
        result["reference"] = reference
        result["ratio"] = {key: result[key] / reference[key] for key in reference
                           if isinstance(reference[key], (int, float)) and key in result and reference[key]}
        result["interleaved"] = _run_isolated(measure_training_interleaved, settings, reference_repo)
    return result


def _add_mfu(values: dict, flops_per_image: float, peaks: dict, mixed_precision: str) -> None:
    """Model FLOP utilisation against both matmul peaks; `mfu` uses the peak of the precision run."""
    achieved = flops_per_image * values["train_img_per_s"]
    values["achieved_flops"] = achieved
    values["mfu_fp32_peak"] = achieved / peaks["fp32"]
    values["mfu_bf16_peak"] = achieved / peaks["bf16"]
    values["mfu"] = values["mfu_fp32_peak"] if mixed_precision == "no" else values["mfu_bf16_peak"]


# ---------------------------------------------------------------- equal-quality check
def train_reference_on_recipe(recipe, reference_repo: str) -> dict:
    """Run in a subprocess: the reference's networks, loss, optimizer set-up, schedules, clipping,
    last-layer freeze and EMA (`main_dino.train_one_epoch`'s loop) for `recipe.epochs`, fed by
    hf_dino's data pipeline (identical crops: same seed), then the 20-NN of its teacher backbone
    (converted with `hf_dino.conversion`) by hf_dino's k-NN. Only the training code differs from
    an hf_dino run of the same recipe. The converted teacher backbone is saved as a transformers
    model folder, `recipe.output_dir/reference_teacher_backbone`, for further evaluation."""
    from hf_dino.conversion import VIT_KEYS, load_strict, reference_to_transformers, vit_config_from_reference
    from hf_dino.data import FALLBACK_VAL_SPLITS, MultiCropDataset, collate_multicrop, load_dataset_dict, select_split
    from hf_dino.evaluation import knn_evaluate_splits
    from hf_dino.hub import save_backbone_folder
    from hf_dino.transforms import MultiCropAugmentation

    vits, utils, main_dino = import_reference(reference_repo)
    _single_process_group()
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    torch.manual_seed(recipe.seed)
    student, teacher = reference_student_and_teacher(vits, utils, recipe)

    dataset_dict = load_dataset_dict(recipe.dataset_name)
    augmentation = MultiCropAugmentation(
        global_crop_size=recipe.global_crop_size, local_crop_size=recipe.local_crop_size,
        global_crops_scale=recipe.global_crops_scale, local_crops_scale=recipe.local_crops_scale,
        local_crops_number=recipe.local_crops_number, params=recipe.augmentation_params())
    train_split = select_split(dataset_dict, recipe.train_split)
    if recipe.max_train_samples is not None:
        train_split = train_split.select(range(min(recipe.max_train_samples, len(train_split))))
    dataset = MultiCropDataset(train_split, augmentation, recipe.image_column, seed=recipe.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=recipe.batch_size_per_device, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(recipe.seed),
                                         num_workers=0, collate_fn=collate_multicrop)  # in-process: workers
    # would inherit the reference's import paths (and its torchvision); crops do not depend on workers
    iterations = len(loader)
    total_steps = recipe.epochs * iterations
    lr_schedule = utils.cosine_scheduler(recipe.lr * recipe.batch_size_per_device / 256.0, recipe.min_lr,
                                         recipe.epochs, iterations, warmup_epochs=recipe.warmup_epochs)
    wd_schedule = utils.cosine_scheduler(recipe.weight_decay, recipe.weight_decay_end, recipe.epochs, iterations)
    momentum_schedule = utils.cosine_scheduler(recipe.momentum_teacher, recipe.momentum_teacher_end,
                                               recipe.epochs, iterations)
    dino_loss = main_dino.DINOLoss(recipe.out_dim, 2 + recipe.local_crops_number, recipe.warmup_teacher_temp,
                                   recipe.teacher_temp, recipe.warmup_teacher_temp_epochs, recipe.epochs,
                                   student_temp=recipe.student_temp, center_momentum=recipe.center_momentum)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    student.train()
    teacher.train()
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        dataset.set_epoch(epoch)
        for iteration, batch in enumerate(loader):
            step = epoch * iterations + iteration
            for index, group in enumerate(optimizer.param_groups):
                group["lr"] = lr_schedule[step]
                if index == 0:
                    group["weight_decay"] = wd_schedule[step]
            images = batch["crops"]
            teacher_output = teacher(images[:2])
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output, epoch)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"reference loss {loss.item()} at step {step}")
            optimizer.zero_grad()
            loss.backward()
            if recipe.clip_grad:
                utils.clip_gradients(student, recipe.clip_grad)
            utils.cancel_gradients_last_layer(epoch, student, recipe.freeze_last_layer)
            optimizer.step()
            with torch.no_grad():
                momentum = momentum_schedule[step]
                for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                    param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
    train_time = time.perf_counter() - start

    reference_state = teacher.backbone.state_dict()
    config = vit_config_from_reference(reference_state)
    from transformers import ViTModel

    backbone = ViTModel(config, add_pooling_layer=False)
    load_strict(backbone, reference_to_transformers(reference_state, VIT_KEYS)[0], "reference teacher")
    save_backbone_folder(backbone, os.path.join(recipe.output_dir, "reference_teacher_backbone"), recipe,
                         {"implementation": "facebookresearch/dino training loop", "global_step": total_steps})
    knn = knn_evaluate_splits(
        backbone, select_split(dataset_dict, recipe.train_split),
        select_split(dataset_dict, recipe.val_split, fallbacks=FALLBACK_VAL_SPLITS), crop_size=recipe.evaluation_image_size,
        ks=(recipe.knn_k,), temperature=recipe.knn_temperature, num_workers=0,
        max_train_samples=recipe.knn_max_train_samples)
    return {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "steps": total_steps,
            "train_time_s": train_time}


def train_hf_dino_on_recipe(recipe) -> dict:
    """Run in a subprocess: an hf_dino run of `recipe` and its teacher's k-NN."""
    from hf_dino.trainer import DinoTrainer

    results = DinoTrainer(recipe).train()
    return {"knn_top1": results["knn"]["top1"], "knn_top5": results["knn"]["top5"],
            "steps": results["global_step"], "train_time_s": results["train_time_s"]}


def compare_quality(config_path: str, reference_repo: str, epochs: int, seeds=(0,), output_dir: str = "/tmp",
                    num_threads: int | None = None) -> dict:
    """k-NN after the same number of steps of the same recipe, hf_dino vs the reference, per seed.
    Both teacher backbones stay in `output_dir/hf_dino_quality_seed{seed}/` (`teacher_backbone`,
    `reference_teacher_backbone`) for `scripts/eval_knn.py` on a larger split."""
    from hf_dino.recipe import DinoRecipe

    rows = []
    for seed in seeds:
        recipe = DinoRecipe.from_yaml(config_path, epochs=epochs, seed=seed, eval_every=None, num_threads=num_threads,
                                      output_dir=os.path.join(output_dir, f"hf_dino_quality_seed{seed}"))
        ours = _run_isolated(train_hf_dino_on_recipe, recipe)
        reference = _run_isolated(train_reference_on_recipe, recipe, reference_repo)
        rows.append({"seed": seed, "hf_dino": ours, "reference": reference})
    return {"config": config_path, "epochs": epochs, "runs": rows,
            "knn_top1_difference": [row["hf_dino"]["knn_top1"] - row["reference"]["knn_top1"] for row in rows]}
