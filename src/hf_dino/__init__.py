"""hf_dino: DINO self-supervised pretraining of vision transformers on the Hugging Face stack."""

from transformers import AutoConfig, AutoModel

from .configuration_cifar_resnet import CifarResNetConfig
from .configuration_dino import DinoConfig, build_backbone_config
from .loss import DinoLoss, DinoLossOutput
from .modeling_cifar_resnet import CifarResNetModel
from .modeling_dino import DinoHead, DinoModel, DinoModelOutput
from .recipe import DinoRecipe, parse_recipe
from .transforms import MultiCropAugmentation, evaluation_transform

AutoConfig.register(DinoConfig.model_type, DinoConfig, exist_ok=True)
AutoModel.register(DinoConfig, DinoModel, exist_ok=True)
# `save_pretrained` then writes an `auto_map` and copies configuration_dino.py / modeling_dino.py
# beside the weights, so a saved `dino/` folder also loads with `trust_remote_code=True` where
# hf_dino is not installed.
DinoConfig.register_for_auto_class()
DinoModel.register_for_auto_class("AutoModel")
# Likewise a CIFAR-stem ResNet's teacher_backbone/ (configuration_ / modeling_cifar_resnet.py); the
# AutoConfig / AutoModel registration of this model type happens where DinoModel needs it.
CifarResNetConfig.register_for_auto_class()
CifarResNetModel.register_for_auto_class("AutoModel")

__version__ = "0.1.0"
__all__ = [
    "CifarResNetConfig", "CifarResNetModel", "DinoConfig", "DinoHead", "DinoLoss", "DinoLossOutput", "DinoModel",
    "DinoModelOutput", "DinoRecipe", "DinoTrainer", "MultiCropAugmentation", "build_backbone_config",
    "evaluation_transform", "parse_recipe",
]


def __getattr__(name: str):
    """`hf_dino.DinoTrainer`, imported on first use (it brings Accelerate and the data pipeline)."""
    if name == "DinoTrainer":
        from .trainer import DinoTrainer

        return DinoTrainer
    raise AttributeError(f"module 'hf_dino' has no attribute {name!r}")
