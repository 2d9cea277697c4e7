"""`DinoRecipe`: every hyper-parameter of a pretraining run, with the paper's defaults.

Field names follow the reference implementation's `main_dino.py` arguments. Values come
from (lowest to highest precedence) these defaults, a YAML file and command-line flags;
`validate` rejects a bad combination before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .configuration_dino import SUPPORTED_ARCHS, VIT_PRESETS
from .modeling_dino import ATTENTION_IMPLEMENTATIONS

OPTIMIZERS = ("adamw", "sgd")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class DinoRecipe:
    # --- model (Sec. 3.1, Appendix A) ---
    arch: str = "vit_small"
    patch_size: int = 16
    num_hidden_layers: int | None = None  # None: the preset depth (12); fewer for CPU demos
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_num_layers: int = 3
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    drop_path_rate: float = 0.1
    # start student and teacher backbones from a pretrained ViTModel / ResNetModel (folder or Hub
    # id, e.g. facebook/dino-vits16) to continue pretraining on another domain
    init_backbone: str | None = None
    # --- teacher and loss ---
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0  # cosine schedule momentum_teacher -> momentum_teacher_end
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    # --- optimisation ---
    optimizer: str = "adamw"
    lr: float = 0.0005  # at a global batch of 256; scaled linearly with the batch
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    sgd_momentum: float = 0.9
    clip_grad: float = 3.0  # per-parameter gradient-norm clipping, as the reference; 0 disables
    freeze_last_layer: int = 1
    batch_size_per_device: int = 64
    gradient_accumulation_steps: int = 1
    epochs: int = 100
    max_steps: int | None = None  # optimizer steps; overrides `epochs` when set
    # --- multi-crop augmentation ---
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_number: int = 8
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    global_crop_size: int = 224
    local_crop_size: int = 96
    # Gaussian blur probability of (first global, second global, local) crops and its sigma range
    # in pixels of the crop; solarisation probability of the second global crop (BYOL's values).
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.2
    # colour jitter (brightness, contrast, saturation, hue) applied with `color_jitter_prob`, then
    # grayscale with `grayscale_prob` (BYOL's 0.4/0.4/0.2/0.1, 0.8 and 0.2)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    # --- data ---
    dataset_name: str | None = None  # None: the embedded CIFAR-10 demo sample
    train_split: str = "train"
    val_split: str = "validation"
    image_column: str = "image"
    label_column: str = "label"
    streaming: bool = False
    max_train_samples: int | None = None
    num_workers: int = 4
    num_threads: int | None = None  # CPU only: torch threads per process; None = cores / local processes
    # CPU only: glibc malloc keeps freed memory for the next step instead of page-faulting it in
    # again every step (trainer.keep_freed_cpu_memory)
    keep_freed_cpu_memory: bool = True
    # --- run ---
    seed: int = 0
    output_dir: str = "outputs/dino"
    mixed_precision: str = "no"
    # ViT attention kernel while training: "auto" = SDPA, or eager matmuls on a CPU under bf16/fp16
    # (faster there; see modeling_dino.training_attention_implementation)
    attn_implementation: str = "auto"
    # torch.compile the student's and the teacher's forward (inductor): fuses the elementwise ops
    # and casts around the matmuls; costs minutes of compilation at the start of a run
    torch_compile: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    checkpointing_steps: int | None = None
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    report_to: str | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False
    # --- k-NN of the teacher on the held-out split: every `eval_every` steps and at the end ---
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_eval_at_end: bool = True
    knn_max_train_samples: int | None = None
    eval_every: int | None = None  # optimizer steps between online k-NN evaluations; None: only at the end

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

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def validate(self) -> None:
        """Raise ValueError naming every problem and what to change, before any work starts."""
        problems = []
        if self.arch not in SUPPORTED_ARCHS:
            problems.append(f"arch {self.arch!r} is unknown; use one of {', '.join(SUPPORTED_ARCHS)}")
        if self.arch in VIT_PRESETS:
            for name in ("global_crop_size", "local_crop_size"):
                size = getattr(self, name)
                if size % self.patch_size:
                    problems.append(f"{name}={size} is not a multiple of patch_size={self.patch_size}; "
                                    f"use e.g. {max(self.patch_size, size // self.patch_size * self.patch_size)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            problems.append(f"attn_implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "drop_path_rate"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} is negative; it must be >= 0")
        for name in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        for name in ("momentum_teacher", "momentum_teacher_end", "center_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must lie in [0, 1]")
        for name in ("batch_size_per_device", "epochs", "out_dim", "gradient_accumulation_steps", "logging_steps"):
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


def build_argument_parser() -> argparse.ArgumentParser:
    """`--config FILE` plus one `--FIELD` flag per recipe field (values parsed later)."""
    parser = argparse.ArgumentParser(description="DINO self-supervised pretraining", allow_abbrev=False)
    parser.add_argument("--config", help="YAML recipe (see configs/); flags override its values")
    hints = typing.get_type_hints(DinoRecipe)
    for f in dataclasses.fields(DinoRecipe):
        nargs = len(typing.get_args(hints[f.name])) if typing.get_origin(hints[f.name]) is tuple else None
        parser.add_argument(f"--{f.name}", nargs=nargs, default=argparse.SUPPRESS,
                            help=f"default: {f.default}")
    return parser


def parse_recipe(argv: list[str] | None = None) -> DinoRecipe:
    """Defaults < `--config` YAML < command-line flags; validated."""
    namespace = vars(build_argument_parser().parse_args(argv))
    config_path = namespace.pop("config", None)
    if config_path:
        recipe = DinoRecipe.from_yaml(config_path, **namespace)
    else:
        recipe = DinoRecipe.from_dict(namespace, source="command line")
    recipe.validate()
    return recipe
