"""The student and teacher of a recipe: `DinoModel`s built from its architecture fields, with random
weights or the backbone of `recipe.init_backbone`.

Next to the model rather than inside `modeling_dino.py`: transformers saves that file with every
`DinoModel` as its remote code, so it may import nothing of hf_dino but `configuration_dino`.
"""

from __future__ import annotations

import copy
import logging

from transformers import AutoConfig, AutoModel

from .configuration_dino import DinoConfig
from .modeling_dino import DinoModel
from .attention_initialization import initialize_attention_
from .position_embeddings import initialize_position_embeddings_
from .recipe import DinoRecipe

logger = logging.getLogger(__name__)


def pretrained_backbone_config(recipe: DinoRecipe):
    """The config of `recipe.init_backbone`, checked against the recipe's architecture."""
    config = AutoConfig.from_pretrained(recipe.init_backbone)
    expected = recipe.backbone_config()
    if config.model_type != expected.model_type:
        raise ValueError(f"init_backbone {recipe.init_backbone} is a {config.model_type!r} model but the recipe "
                         f"(arch {recipe.arch!r}, resnet_stem {recipe.resnet_stem!r}) is {expected.model_type!r}; "
                         "set --arch / --resnet_stem accordingly")
    fields = (("hidden_size", "num_attention_heads", "num_hidden_layers", "patch_size") if config.model_type == "vit"
              else ("hidden_sizes", "depths", "layer_type"))
    differences = [f"{name}: checkpoint {getattr(config, name)} vs recipe {getattr(expected, name)}"
                   for name in fields if getattr(config, name) != getattr(expected, name)]
    if differences:
        raise ValueError(f"init_backbone {recipe.init_backbone} does not match the recipe ({'; '.join(differences)}); "
                         "set --arch / --patch_size / --num_hidden_layers / --hidden_size / --num_attention_heads "
                         "to the checkpoint's")
    if config.model_type == "vit":  # the checkpoint's own position grid; other sizes are interpolated
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    return config


def build_dino_config(recipe: DinoRecipe, drop_path_rate: float) -> DinoConfig:
    """The `DinoConfig` of a recipe's backbone (fresh, or `recipe.init_backbone`'s) and head."""
    if recipe.init_backbone:
        backbone_config = pretrained_backbone_config(recipe)
    else:
        backbone_config = recipe.backbone_config()
    return DinoConfig(
        backbone_config=backbone_config,
        out_dim=recipe.out_dim,
        head_hidden_dim=recipe.head_hidden_dim,
        head_bottleneck_dim=recipe.head_bottleneck_dim,
        head_num_layers=recipe.head_num_layers,
        use_bn_in_head=recipe.use_bn_in_head,
        norm_last_layer=recipe.norm_last_layer,
        drop_path_rate=drop_path_rate,
    )


def initialize_vit_backbone_(vit, recipe: DinoRecipe) -> None:
    """A freshly built transformers ViT as the recipe starts it: `position_embedding_init` (random or
    sincos), then `attention_init` (random or mimetic, drawn from `recipe.seed`). The one place that maps
    these fields, for the trainer and the benchmarks that train the recipe's backbone elsewhere."""
    initialize_position_embeddings_(vit, recipe.position_embedding_init)
    initialize_attention_(vit, recipe.attention_init, recipe.seed)


def build_student_and_teacher(recipe: DinoRecipe, attn_implementation: str | None = None) -> tuple[DinoModel, DinoModel]:
    """Student (with stochastic depth) and teacher (without), starting from identical weights:
    random (a ViT's position embeddings and attention as `initialize_vit_backbone_` sets them from the
    recipe), or the backbone of `recipe.init_backbone` (the head always starts random).
    `attn_implementation` ("sdpa", "eager"; None keeps transformers' default) sets a ViT's
    attention kernel; it is not saved with the weights."""
    student_config = build_dino_config(recipe, recipe.drop_path_rate)
    student = DinoModel(student_config)
    if recipe.init_backbone:
        from .conversion import load_strict  # conversion.py imports heavier modules (hub)

        pretrained = AutoModel.from_pretrained(recipe.init_backbone)
        state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("pooler.")}
        load_strict(student.backbone, state, f"init_backbone {recipe.init_backbone}")
        logger.info("Student and teacher backbones start from %s", recipe.init_backbone)
    elif student.is_vit:
        initialize_vit_backbone_(student.backbone, recipe)
    teacher_config = copy.deepcopy(student_config)
    teacher_config.drop_path_rate = 0.0
    teacher = DinoModel(teacher_config)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if attn_implementation and student.is_vit:
        for model in (student, teacher):
            model.set_attn_implementation(attn_implementation)
    return student, teacher
