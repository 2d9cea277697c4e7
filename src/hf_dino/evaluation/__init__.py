"""Evaluations of frozen DINO features, one module per protocol of the paper.

- `features`: load a backbone (folder, Hub id or `DinoModel`) and extract its DINO features.
- `metrics`: top-k accuracy through the packaged `evaluate` modules.
- `knn`: weighted k-NN classification (Sec. 4.1).
- `linear`: linear probe on frozen features (Sec. 4.1).

Transfer evaluations (Sec. 4.2) live beside them as modules of their own, and so does
`attention_segmentation`: the paper's probe of the self-attention map (Jaccard of thresholded
last-block [CLS] attention against object masks, DAVIS and PASCAL VOC layouts).
"""

from .features import RawPixels, backbone_cls_features, extract_features, load_frozen_backbone
from .knn import knn_class_scores, knn_evaluate, knn_evaluate_splits
from .metrics import load_metric, topk_accuracy

__all__ = [
    "RawPixels", "backbone_cls_features", "extract_features", "knn_class_scores", "knn_evaluate",
    "knn_evaluate_splits", "load_frozen_backbone", "load_metric", "topk_accuracy",
]
