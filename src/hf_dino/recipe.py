"""`DinoRecipe`: every hyper-parameter of a pretraining run, with the paper's defaults.

Field names follow the reference implementation's `main_dino.py` arguments. Values come
from (lowest to highest precedence) these defaults, a YAML file and command-line flags;
`validate` rejects a bad combination before any work starts.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .attention_initialization import ATTENTION_INITS
from .configuration_dino import RESNET_STEMS, SUPPORTED_ARCHS, VIT_PRESETS, build_backbone_config
from .loss import TEACHER_CENTERINGS
from .modeling_dino import ATTENTION_IMPLEMENTATIONS

OPTIMIZERS = ("adamw", "sgd")
POSITION_EMBEDDING_INITS = ("random", "sincos")
MIXED_PRECISION = ("no", "bf16", "fp16")
# Accelerate's trackers (`log_with`), plus "all"
TRACKERS = ("all", "tensorboard", "wandb", "trackio", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class DinoRecipe:
    """Every hyper-parameter of a DINO pretraining run (`accelerate launch scripts/pretrain.py --help`)."""

    # --- model (Sec. 3.1, Appendix A) ---
    arch: str = field(default="vit_small", metadata=_help(
        "backbone architecture", choices=list(SUPPORTED_ARCHS)))
    patch_size: int = field(default=16, metadata=_help("ViT patch size in pixels (8 or 16 in the paper)"))
    num_hidden_layers: int | None = field(default=None, metadata=_help(
        "ViT depth; unset: the preset's depth (12); fewer blocks for CPU demos"))
    hidden_size: int | None = field(default=None, metadata=_help(
        "ViT width; unset: the preset's (vit_tiny 192, vit_small 384, vit_base 768). ResNet: the first "
        "stage's width, doubled per stage (unset: 64)"))
    num_attention_heads: int | None = field(default=None, metadata=_help(
        "ViT attention heads; unset: the preset's (3, 6, 12); must divide the width"))
    resnet_stem: str = field(default="imagenet", metadata=_help(
        "ResNet stem: imagenet (7x7 stride-2 convolution + max-pool; a plain transformers ResNetModel) or cifar "
        "(3x3 stride 1, no max-pool, for 32 px images; saved with its code: load with trust_remote_code=True "
        "where hf_dino is not installed)", choices=list(RESNET_STEMS)))
    out_dim: int = field(default=65536, metadata=_help("K, the number of DINO head outputs (prototypes)"))
    head_hidden_dim: int = field(default=2048, metadata=_help("hidden width of the head's 3-layer MLP"))
    head_bottleneck_dim: int = field(default=256, metadata=_help("L2-normalised bottleneck before the last layer"))
    head_num_layers: int = field(default=3, metadata=_help("MLP layers of the head before the bottleneck"))
    norm_last_layer: bool = field(default=True, metadata=_help(
        "fix the weight norm of the head's last layer to 1 (false: more stable for ViT-S, as the reference notes)"))
    use_bn_in_head: bool = field(default=False, metadata=_help("BatchNorm in the head's MLP (the ResNet recipe)"))
    drop_path_rate: float = field(default=0.1, metadata=_help("stochastic depth rate of the student"))
    position_embedding_init: str = field(default="random", metadata=_help(
        "ViT position embeddings at initialisation: random (truncated normal, std 0.02, as the reference) or "
        "sincos (2-D sine-cosine values, as MAE / MoCo v3, still trained): the patch grid from the first step, "
        "which short runs need", choices=list(POSITION_EMBEDDING_INITS)))
    attention_init: str = field(default="random", metadata=_help(
        "ViT attention weights at initialisation: random (truncated normal, std 0.02, as the reference) or "
        "mimetic (Trockman & Kolter 2023: each head's query-key product starts near 0.7 Z + 0.7 I, the "
        "value-output product near 0.4 Z - 0.4 I, so tokens attend to similar tokens, with sincos positions to "
        "their neighbours; still trained)", choices=list(ATTENTION_INITS)))
    init_backbone: str | None = field(default=None, metadata=_help(
        "start student and teacher backbones from a pretrained ViTModel / ResNetModel (folder or Hub id, "
        "e.g. facebook/dino-vits16) to continue pretraining on another domain"))
    # --- teacher and loss ---
    momentum_teacher: float = field(default=0.996, metadata=_help(
        "EMA momentum of the teacher at the start; cosine schedule to momentum_teacher_end"))
    momentum_teacher_end: float = field(default=1.0, metadata=_help("EMA momentum of the teacher at the end"))
    warmup_teacher_temp: float = field(default=0.04, metadata=_help("teacher temperature at the start of warm-up"))
    teacher_temp: float = field(default=0.07, metadata=_help("teacher temperature after warm-up"))
    warmup_teacher_temp_epochs: int = field(default=30, metadata=_help("epochs of linear teacher-temperature warm-up"))
    warmup_teacher_temp_steps: int | None = field(default=None, metadata=_help(
        "optimizer steps of linear teacher-temperature warm-up (per step, not per epoch); overrides "
        "--warmup_teacher_temp_epochs when set (short runs)"))
    student_temp: float = field(default=0.1, metadata=_help("student temperature"))
    center_momentum: float = field(default=0.9, metadata=_help("EMA momentum of the centre of teacher outputs"))
    teacher_centering: str = field(default="center", metadata=_help(
        "teacher targets: center (the paper: softmax of the logits minus an EMA centre) or sinkhorn_knopp "
        "(DINOv2's option: 3 Sinkhorn-Knopp iterations over the global batch)", choices=list(TEACHER_CENTERINGS)))
    koleo_loss_weight: float = field(default=0.0, metadata=_help(
        "weight of the KoLeo regulariser on the student's backbone features of each global crop, over the global "
        "batch (every process's images; DINOv2: 0.1); 0: the paper's loss"))
    # --- optimisation ---
    optimizer: str = field(default="adamw", metadata=_help("optimizer", choices=list(OPTIMIZERS)))
    lr: float = field(default=0.0005, metadata=_help(
        "peak learning rate at a global batch of 256, scaled linearly with the global batch",
        aliases=["--learning_rate"]))
    min_lr: float = field(default=1e-6, metadata=_help("learning rate at the end of the cosine schedule"))
    warmup_epochs: int = field(default=10, metadata=_help("epochs of linear learning-rate warm-up"))
    warmup_steps: int | None = field(default=None, metadata=_help(
        "optimizer steps of linear learning-rate warm-up; overrides --warmup_epochs when set (short runs)"))
    weight_decay: float = field(default=0.04, metadata=_help("weight decay at the start (cosine schedule)"))
    weight_decay_end: float = field(default=0.4, metadata=_help("weight decay at the end"))
    sgd_momentum: float = field(default=0.9, metadata=_help("momentum of --optimizer sgd"))
    clip_grad: float = field(default=3.0, metadata=_help(
        "per-parameter gradient-norm clipping as the reference; 0 disables"))
    freeze_last_layer: int = field(default=1, metadata=_help("epochs during which the head's last layer is frozen"))
    batch_size_per_device: int = field(default=64, metadata=_help(
        "images per device per step", aliases=["--per_device_train_batch_size"]))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    epochs: int = field(default=100, metadata=_help("training epochs", aliases=["--num_train_epochs"]))
    max_steps: int | None = field(default=None, metadata=_help("optimizer steps; overrides --epochs when set"))
    # --- multi-crop augmentation ---
    global_crops_scale: tuple[float, float] = field(default=(0.4, 1.0), metadata=_help(
        "area range (fraction of the image) of the 2 global crops"))
    local_crops_number: int = field(default=8, metadata=_help("number of local crops (student only)"))
    local_crops_scale: tuple[float, float] = field(default=(0.05, 0.4), metadata=_help(
        "area range of the local crops"))
    global_crop_size: int = field(default=224, metadata=_help("side of the global crops in pixels"))
    local_crop_size: int = field(default=96, metadata=_help("side of the local crops in pixels"))
    blur_probs: tuple[float, float, float] = field(default=(1.0, 0.1, 0.5), metadata=_help(
        "Gaussian blur probability of the first global, second global and local crops (BYOL's)"))
    blur_sigma: tuple[float, float] = field(default=(0.1, 2.0), metadata=_help(
        "blur sigma range in pixels of the crop"))
    solarize_prob: float = field(default=0.2, metadata=_help("solarisation probability of the second global crop"))
    color_jitter: tuple[float, float, float, float] = field(default=(0.4, 0.4, 0.2, 0.1), metadata=_help(
        "colour jitter strengths: brightness, contrast, saturation, hue (BYOL's)"))
    color_jitter_prob: float = field(default=0.8, metadata=_help("probability of the colour jitter"))
    grayscale_prob: float = field(default=0.2, metadata=_help("probability of grayscale conversion"))
    # --- data ---
    dataset_name: str | None = field(default=None, metadata=_help(
        "Hub dataset id, local folder (image folder, or parquet/arrow files named by split) or file glob; "
        "unset: the embedded CIFAR-10 demo sample"))
    dataset_config_name: str | None = field(default=None, metadata=_help("configuration of a Hub dataset"))
    train_split: str = field(default="train", metadata=_help("split to pretrain on"))
    val_split: str = field(default="validation", metadata=_help(
        "held-out split of the k-NN evaluation; falls back to test when absent"))
    image_column: str = field(default="image", metadata=_help("column holding the images"))
    label_column: str = field(default="label", metadata=_help("column holding the labels (k-NN only)"))
    streaming: bool = field(default=False, metadata=_help("stream the dataset instead of downloading it whole"))
    max_train_samples: int | None = field(default=None, metadata=_help(
        "first N training images only (with --streaming: the stream's length, needed for the schedules)"))
    shuffle_buffer_size: int = field(default=10_000, metadata=_help(
        "with --streaming: each DataLoader worker shuffles its stream in blocks of this many examples (1: stream "
        "order), after 🤗 datasets shuffles the shard order"))
    max_image_pixels: int = field(default=100_000_000, metadata=_help(
        "images with more pixels (width x height) are skipped from their header, before decoding, and counted "
        "with the undecodable ones: a decompression bomb (a 30000 x 30000 PNG of 100 kB) never reaches a worker's "
        "memory. Raise it for gigapixel data"))
    num_workers: int = field(default=4, metadata=_help("DataLoader worker processes per device"))
    num_threads: int | None = field(default=None, metadata=_help(
        "CPU only: torch threads per process; unset: cores / local processes"))
    keep_freed_cpu_memory: bool = field(default=True, metadata=_help(
        "CPU only: glibc malloc keeps freed memory for the next step instead of page-faulting it in again"))
    # --- run ---
    seed: int = field(default=0, metadata=_help("seed of initialisation and augmentations"))
    output_dir: str = field(default="outputs/dino", metadata=_help("where the run writes its outputs"))
    mixed_precision: str | None = field(default=None, metadata=_help(
        "no, bf16 or fp16; unset: as `accelerate launch` / `accelerate config` says", choices=list(MIXED_PRECISION)))
    attn_implementation: str = field(default="auto", metadata=_help(
        "ViT attention kernel while training: auto = SDPA, or eager matmuls on a CPU under bf16/fp16 (faster there)",
        choices=list(ATTENTION_IMPLEMENTATIONS)))
    torch_compile: bool = field(default=False, metadata=_help(
        "torch.compile the student's and teacher's forwards (minutes of compilation at the start)"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute each block in the backward pass"))
    logging_steps: int = field(default=10, metadata=_help("optimizer steps between metrics.jsonl lines"))
    checkpointing_steps: int | None = field(default=None, metadata=_help(
        "optimizer steps between checkpoint-STEP/ folders; unset: none"))
    save_total_limit: int | None = field(default=None, metadata=_help("keep only the newest N checkpoints"))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help(
        "a checkpoint-STEP folder, or 'latest' for the newest in --output_dir"))
    report_to: str | None = field(default=None, metadata=_help(
        "trackers: none, all, or a comma-separated list of tensorboard, wandb, trackio, comet_ml, aim, mlflow, "
        "clearml, dvclive, swanlab"))
    push_to_hub: bool = field(default=False, metadata=_help(
        "push the teacher backbone and its card at every checkpoint and at the end"))
    hub_model_id: str | None = field(default=None, metadata=_help("ORG/NAME of the Hub repository"))
    hub_private_repo: bool = field(default=False, metadata=_help("create the Hub repository private"))
    # --- k-NN of the teacher on the held-out split ---
    knn_k: int = field(default=20, metadata=_help("k of the online and final k-NN"))
    knn_temperature: float = field(default=0.07, metadata=_help("temperature of the k-NN votes"))
    knn_eval_at_end: bool = field(default=True, metadata=_help("k-NN of the teacher at the end of training"))
    knn_max_train_samples: int | None = field(default=None, metadata=_help("k-NN memory bank: first N images only"))
    eval_image_size: int | None = field(default=None, metadata=_help(
        "side in pixels at which the teacher is evaluated (online and final k-NN) and saved: `teacher_backbone` "
        "takes images of this size natively (a ViT's position embeddings resampled as interpolate_pos_encoding "
        "does) and its image processor resizes to it. A test resolution above the training one corrects the "
        "object-size shift of random-resized crops (FixRes, Touvron et al. 2019); unset: global_crop_size"))
    eval_every: int | None = field(default=None, metadata=_help(
        "optimizer steps between online k-NN evaluations; unset: only at the end"))

    # ------------------------------------------------------------------ helpers
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> DinoRecipe:
        """Read a YAML recipe; unknown keys are an error that lists the valid ones."""
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a recipe must be a mapping of field: value")
        values.update(overrides)
        return cls.from_dict(values, source=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "recipe") -> DinoRecipe:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)}. "
                             f"Valid fields: {', '.join(cls.field_names())}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _coerce(name, value, hints[name]) for name, value in values.items()})

    def augmentation_params(self):
        """The recipe's `AugmentationParams` (blur and solarisation; the rest are BYOL's)."""
        from .transforms import AugmentationParams

        global_1, global_2, local = self.blur_probs
        brightness, contrast, saturation, hue = self.color_jitter
        return AugmentationParams(blur_sigma=self.blur_sigma, blur_prob_global_1=global_1,
                                  blur_prob_global_2=global_2, blur_prob_local=local,
                                  solarize_prob_global_2=self.solarize_prob, color_jitter_prob=self.color_jitter_prob,
                                  brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                                  grayscale_prob=self.grayscale_prob)

    def report_to_list(self) -> list[str]:
        """`report_to` as Accelerate's `log_with`: [] for none/unset, ["all"], or the named trackers."""
        if self.report_to is None:
            return []
        names = [name for name in self.report_to.replace(",", " ").split() if name]
        return [] if names in ([], ["none"]) else names

    @property
    def evaluation_image_size(self) -> int:
        """The side at which the teacher is evaluated and saved: `eval_image_size`, else the global crops'."""
        return self.eval_image_size or self.global_crop_size

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def backbone_config(self):
        """The transformers config of the backbone the architecture fields describe (a preset with
        its overrides); ValueError for an invalid combination."""
        return build_backbone_config(self.arch, self.patch_size, self.global_crop_size,
                                     num_hidden_layers=self.num_hidden_layers, hidden_size=self.hidden_size,
                                     num_attention_heads=self.num_attention_heads, resnet_stem=self.resnet_stem)

    def validate(self) -> None:
        """Raise ValueError naming every problem and what to change, before any work starts."""
        problems = []
        if self.arch not in SUPPORTED_ARCHS:
            problems.append(f"arch {self.arch!r} is unknown; use one of {', '.join(SUPPORTED_ARCHS)}")
        if self.arch in VIT_PRESETS:
            for name in ("global_crop_size", "local_crop_size", "eval_image_size"):
                size = getattr(self, name) or self.patch_size
                if size % self.patch_size:
                    problems.append(f"{name}={size} is not a multiple of patch_size={self.patch_size}; "
                                    f"use e.g. {max(self.patch_size, size // self.patch_size * self.patch_size)}")
        if self.arch in SUPPORTED_ARCHS:
            try:
                self.backbone_config()
            except ValueError as error:
                problems.append(str(error))
        if self.arch in VIT_PRESETS and self.resnet_stem != "imagenet":
            problems.append(f"resnet_stem={self.resnet_stem!r} applies to ResNets only; remove it for {self.arch}")
        for name, methods, what in (("position_embedding_init", POSITION_EMBEDDING_INITS, "position embeddings"),
                                    ("attention_init", ATTENTION_INITS, "attention weights")):
            method = getattr(self, name)  # a ViT initialisation for runs from scratch; "random" is the reference's
            if method not in methods:
                problems.append(f"{name} {method!r} is unknown; use one of {', '.join(methods)}")
            elif method != "random" and self.arch not in VIT_PRESETS:
                problems.append(f"{name}={method} applies to ViTs only; remove it for {self.arch}")
            elif method != "random" and self.init_backbone is not None:
                problems.append(f"{name}={method} would overwrite init_backbone's {what}; remove one of the two")
        if (self.position_embedding_init == "sincos" and self.arch in VIT_PRESETS
                and (self.hidden_size or VIT_PRESETS[self.arch]["hidden_size"]) % 4):
            problems.append(f"position_embedding_init=sincos needs a ViT width divisible by 4, got {self.hidden_size}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision {self.mixed_precision!r} must be one of {', '.join(MIXED_PRECISION)} "
                            "(or unset: the launcher's)")
        unknown_trackers = sorted(set(self.report_to_list()) - set(TRACKERS))
        if unknown_trackers:
            problems.append(f"report_to {self.report_to!r}: unknown tracker(s) {', '.join(unknown_trackers)}; "
                            f"use none, all or a comma-separated list of {', '.join(TRACKERS)}")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            problems.append(f"attn_implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if self.teacher_centering not in TEACHER_CENTERINGS:
            problems.append(f"teacher_centering {self.teacher_centering!r} is unknown; use one of "
                            f"{', '.join(TEACHER_CENTERINGS)}")
        for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "drop_path_rate",
                     "koleo_loss_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} is negative; it must be >= 0")
        for name in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        for name in ("momentum_teacher", "momentum_teacher_end", "center_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must lie in [0, 1]")
        for name in ("batch_size_per_device", "epochs", "out_dim", "gradient_accumulation_steps", "logging_steps",
                     "shuffle_buffer_size", "max_image_pixels"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.local_crops_number < 0:
            problems.append("local_crops_number must be >= 0")
        if not all(0 <= p <= 1 for p in (*self.blur_probs, self.solarize_prob, self.color_jitter_prob,
                                         self.grayscale_prob)):
            problems.append("blur_probs, solarize_prob, color_jitter_prob and grayscale_prob must lie in [0, 1]")
        if min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
            problems.append(f"color_jitter={self.color_jitter} must be >= 0, with hue <= 0.5")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            problems.append(f"blur_sigma={self.blur_sigma} must satisfy 0 < min <= max")
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                problems.append(f"{name}={getattr(self, name)} must satisfy 0 < min <= max <= 1")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be >= 1 (or unset to use epochs)")
        if self.eval_image_size is not None and self.eval_image_size < 1:
            problems.append(f"eval_image_size={self.eval_image_size} must be >= 1 (or unset: global_crop_size)")
        for name in ("warmup_steps", "warmup_teacher_temp_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (or unset to count in epochs)")
        if self.eval_every is not None and self.eval_every < 1:
            problems.append("eval_every must be >= 1 (or unset)")
        if self.checkpointing_steps is not None and self.checkpointing_steps < 1:
            problems.append("checkpointing_steps must be >= 1 (or unset)")
        if self.push_to_hub and not self.hub_model_id:
            problems.append("push_to_hub needs --hub_model_id ORG/NAME")
        if self.dataset_name is not None and not any(c in self.dataset_name for c in "*?["):
            from .data import looks_like_local_path

            if looks_like_local_path(self.dataset_name) and not Path(self.dataset_name).expanduser().exists():
                problems.append(f"dataset_name {self.dataset_name!r} does not exist; give a Hub id, "
                                "a local directory or a file glob")
        if self.init_backbone is not None:
            from .data import looks_like_local_path

            if looks_like_local_path(self.init_backbone) and not Path(self.init_backbone).expanduser().exists():
                problems.append(f"init_backbone {self.init_backbone!r} does not exist; give a model folder or Hub id")
        if problems:
            raise ValueError("Invalid recipe:\n  - " + "\n  - ".join(problems))


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML / command-line value to the field's declared type."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _coerce(name, value, args[0])
    if origin is tuple:
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if len(value) != len(args):
            raise ValueError(f"{name} takes {len(args)} values, got {value!r}")
        return tuple(arg(v) for arg, v in zip(args, value))
    if hint is bool:
        if isinstance(value, str):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{name} takes true/false, got {value!r}")
            return lowered in ("true", "1", "yes")
        return bool(value)
    if hint in (int, float, str):
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be of type {hint.__name__}, got {value!r}") from None
    return value


CONFIGS_DIR_NAME = "configs"
DEFAULT_CONFIG = "demo_cifar10_cpu.yaml"


def config_directories() -> list[Path]:
    """Where recipes named without a folder are found: inside the installed package (a wheel
    carries configs/ as hf_dino/configs), then the checkout's configs/ (editable installs)."""
    package = Path(__file__).resolve().parent
    return [package / CONFIGS_DIR_NAME, package.parents[1] / CONFIGS_DIR_NAME]


def resolve_config(name: str | Path) -> Path:
    """A recipe file: `name` itself when it exists, else `name` (or `name`.yaml) looked up by its
    file name in `config_directories()` — so `configs/vit_small_16.yaml`, `vit_small_16.yaml`
    and `vit_small_16` all work from any directory, with a wheel as with a checkout."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    file_name = path.name if path.suffix in (".yaml", ".yml", ".json") else f"{path.name}.yaml"
    for directory in config_directories():
        if (directory / file_name).is_file():
            return directory / file_name
    available = sorted({p.stem for d in config_directories() if d.is_dir() for p in d.glob("*.yaml")})
    raise FileNotFoundError(f"--config {name}: no such file, and no packaged recipe of that name "
                            f"(packaged: {', '.join(available)})")


def parse_recipe(argv: list[str] | None = None, default_config: str | Path | None = None,
                 description: str = "DINO self-supervised pretraining.") -> DinoRecipe:
    """Defaults < `--config` YAML (else `default_config`) < command-line flags; validated.

    Bad flags, values or recipes exit with code 2 and one line (hf_dino.cli conventions).
    """
    from .cli import config_path_from_argv, parse_args, usage_error

    argv = list(sys.argv[1:] if argv is None else argv)
    config = config_path_from_argv(argv)
    try:
        if config is not None:
            index = next(i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config="))
            resolved = str(resolve_config(config))
            argv[index:index + (1 if argv[index].startswith("--config=") else 2)] = ["--config", resolved]
        elif default_config is not None:
            default_config = resolve_config(default_config)
    except FileNotFoundError as error:
        usage_error(str(error))
    (recipe,) = parse_args(DinoRecipe, argv=argv, description=description,
                           default_config=default_config)
    try:
        recipe.validate()
    except ValueError as error:
        usage_error(str(error).replace("Invalid recipe:\n  - ", "invalid recipe: ").replace("\n  - ", "; "))
    return recipe


def default_recipe_file(argv: list[str]) -> str | None:
    """The recipe file of a pretraining command line without `--config`: the packaged demo when it
    names no dataset either (`accelerate launch scripts/pretrain.py` trains the embedded demo), else
    None, i.e. DinoRecipe's defaults, the paper's ViT-S/16: someone's own `--dataset_name` never
    gets the CIFAR demo's 32 px crops, 3-block ViT and DINOv2 options unasked."""
    from .cli import config_path_from_argv

    return None if config_path_from_argv(argv) is not None or _names_a_dataset(argv) else DEFAULT_CONFIG


def _names_a_dataset(argv: list[str]) -> bool:
    return any(arg == "--dataset_name" or arg.startswith("--dataset_name=") for arg in argv)


def recipe_sources(argv: list[str], default_config: str | Path | None = None) -> str:
    """One line naming the recipe in force and where each of its values came from: the recipe file
    (`--config`, else `default_config`) and its fields, the command-line flags and theirs; every
    other field keeps DinoRecipe's default (the paper's ViT-S/16)."""
    from .cli import build_parser, config_path_from_argv, flag_destinations

    config = config_path_from_argv(argv)
    config_file = resolve_config(config) if config is not None else (
        resolve_config(default_config) if default_config is not None else None)
    destinations = flag_destinations(build_parser(DinoRecipe))
    from_file = []
    if config_file is not None:
        with open(config_file) as handle:
            from_file = [destinations.get(key, key) for key in (yaml.safe_load(handle) or {})]
    from_flags = []
    for arg in argv:
        if arg.startswith("--") and arg != "--config" and not arg.startswith("--config="):
            name = arg[2:].split("=", 1)[0]
            field_name = destinations.get(name) or destinations.get(name.removeprefix("no_"))
            if field_name and field_name not in from_flags:
                from_flags.append(field_name)
    from_file = [name for name in from_file if name not in from_flags]
    if config_file is None:
        why = "--dataset_name without --config" if _names_a_dataset(argv) else "no --config"
        head = f"Recipe: DinoRecipe's defaults, the paper's ViT-S/16 ({why})"
    else:
        why = "the packaged default: no --config and no --dataset_name" if config is None else "--config"
        head = f"Recipe: {config_file.stem} ({why}); from {config_file}: {', '.join(from_file) or 'nothing'}"
    return (f"{head}; from flags: {', '.join(from_flags) or 'none'}; "
            "every other value: DinoRecipe's default (the paper's)")
