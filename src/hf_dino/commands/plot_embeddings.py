"""2-D map (t-SNE or UMAP) of a frozen backbone's CLS features on a labelled image dataset,
coloured by class with a legend of class names (the paper's t-SNE figure).

    python scripts/plot_embeddings.py --model output/teacher_backbone \\
        --dataset_name ../shared/data/cifar10 --max_samples 2000 --resize_ratio 1 \\
        --output docs/images/tsne_cifar10.png --output_json tsne.json

--method umap needs umap-learn (pip install 'hf_dino[umap]'). The JSON gives the number of
points, the map's trustworthiness and the class silhouette in feature space and on the map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cli import DataArguments, emit_json, load_evaluation_splits, model_field, parse_args, usage_error
from .model_loading import default_device, load_model_or_exit


@dataclass
class EmbeddingMapArguments:
    model: str = model_field()
    output: str = field(metadata={"help": "PNG file to write the map to"})
    method: str = field(default="tsne", metadata={"help": "t-SNE (scikit-learn) or UMAP (umap-learn)",
                                                  "choices": ["tsne", "umap"]})
    split: str = field(default="val", metadata={"help": "which split to map: the held-out one or the training one",
                                                "choices": ["val", "train"]})
    max_samples: int | None = field(default=2000, metadata={
        "help": "map a seeded random subset of this many images (t-SNE is quadratic); unset: all"})
    perplexity: float = field(default=30.0, metadata={"help": "t-SNE perplexity (capped below N/3)"})
    seed: int = field(default=0, metadata={"help": "seed of the subset and of the map"})
    image_size: int | None = field(default=None, metadata={"help": "crop size (default: the model's native size)"})
    resize_ratio: float = field(default=256 / 224, metadata={
        "help": "resize to image_size * ratio, then centre-crop image_size (1.0: whole image, e.g. CIFAR)"})
    batch_size: int = field(default=128, metadata={"help": "images per forward pass"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader processes decoding images"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda when available, else cpu)"})
    title: str | None = field(default=None, metadata={"help": "figure title (default: model, data, method)"})
    output_json: str | None = field(default=None, metadata={"help": "write the result JSON here (it is also printed)"})

    def __post_init__(self) -> None:
        if self.max_samples is not None and self.max_samples < 3:
            raise ValueError(f"--max_samples {self.max_samples}: must be >= 3")
        if self.perplexity <= 0:
            raise ValueError(f"--perplexity {self.perplexity}: must be > 0")
        if not self.output.lower().endswith(".png"):
            raise ValueError(f"--output {self.output}: must be a .png file")
        if self.resize_ratio < 1:
            raise ValueError(f"--resize_ratio {self.resize_ratio}: must be >= 1")


def main(argv: list[str] | None = None) -> None:
    args, data_args = parse_args(EmbeddingMapArguments, DataArguments, argv=argv, description=__doc__)
    from ..data import LabelledImageDataset, collate_labelled
    from ..evaluation.embedding_map import (MissingBackendError, embed_2d, map_quality, plot_embedding_map,
                                            subsample_indices)
    from ..evaluation.features import extract_features
    from ..transforms import evaluation_transform

    if args.method == "umap":
        try:
            import umap  # noqa: F401
        except ImportError:
            usage_error("--method umap needs umap-learn: pip install 'hf_dino[umap]' (or use --method tsne)")
    train_split, val_split = load_evaluation_splits(data_args)
    split = val_split if args.split == "val" else train_split
    if data_args.label_column not in (split.features or {}):
        usage_error(f"--label_column {data_args.label_column}: not a column of the dataset "
                    f"({', '.join(split.features or {})})")
    split = split.select(subsample_indices(len(split), args.max_samples, args.seed).tolist())
    if len(split) < 3:
        usage_error(f"--dataset_name {data_args.dataset_name}: {len(split)} image(s); a map needs at least 3")
    device = default_device(args.device)
    model, native_size = load_model_or_exit(args.model, device)
    transform = evaluation_transform(args.image_size or native_size, args.resize_ratio)
    loader = torch.utils.data.DataLoader(
        LabelledImageDataset(split, transform, data_args.image_column, data_args.label_column),
        batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate_labelled)
    features, labels, skipped = extract_features(model, loader, device, "map features")
    try:
        coordinates = embed_2d(features.numpy(), args.method, seed=args.seed, perplexity=args.perplexity)
    except MissingBackendError as error:
        usage_error(str(error))
    class_names = getattr(split.features[data_args.label_column], "names", None)
    data_name = data_args.dataset_name or "demo data"
    title = args.title or (f"{args.method.upper() if args.method == 'umap' else 't-SNE'} of {Path(args.model).name} "
                           f"CLS features: {Path(str(data_name)).name} {args.split}, {len(labels)} images")
    plot_embedding_map(coordinates, labels.numpy(), class_names, args.output, title)
    result = {"output": args.output, "method": args.method, "num_samples": len(labels), "num_skipped": skipped,
              "model": args.model, "dataset": data_name}
    result.update(map_quality(features.numpy(), coordinates, labels.numpy()))
    emit_json(result, args.output_json)


if __name__ == "__main__":
    main()
