"""`CifarResNetConfig`: transformers' `ResNetConfig` for a ResNet with the small-image (CIFAR) stem.

He et al. 2016 (Sec. 4.2) adapt ResNets to 32 px images by replacing the ImageNet stem (7x7
stride-2 convolution + 3x3 stride-2 max-pool, a 4x downsampling) with one 3x3 stride-1
convolution; the first stage then works at full resolution (32 x 32). Every other field means
what it means in `ResNetConfig`; `embedding_size` is the stem's width, and `image_size` (new) the
resolution evaluations use as their crop size: the training resolution, or the run's `eval_image_size`.

Saved beside a `CifarResNetModel`'s weights as its remote code: it imports only transformers.
"""

from __future__ import annotations

from transformers import ResNetConfig


class CifarResNetConfig(ResNetConfig):
    r"""Configuration of [`CifarResNetModel`]: a `ResNetConfig` whose model has the CIFAR stem.

    Example (ResNet-18 for 32 px images; `ResNetConfig`'s fields):

    ```python
    >>> config = CifarResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
    ...                            layer_type="basic")
    ```
    """

    model_type = "cifar_resnet"

    image_size: int = 32


__all__ = ["CifarResNetConfig"]
