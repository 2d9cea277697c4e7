"""2-D maps of frozen features (the paper's t-SNE figure): t-SNE (scikit-learn) or UMAP
(umap-learn, optional), drawn as a scatter coloured by label with a legend of class names."""

from __future__ import annotations

import textwrap

from collections.abc import Sequence
from pathlib import Path

import numpy as np

METHODS = ("tsne", "umap")


class MissingBackendError(ImportError):
    """The requested map needs a package that is not installed."""


def subsample_indices(num_items: int, max_samples: int | None, seed: int = 0) -> np.ndarray:
    """All indices, or a seeded uniform random subset of `max_samples` of them (sorted)."""
    if max_samples is None or max_samples >= num_items:
        return np.arange(num_items)
    return np.sort(np.random.default_rng(seed).choice(num_items, size=max_samples, replace=False))


def embed_2d(features: np.ndarray, method: str = "tsne", seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """features (N, D) -> coordinates (N, 2). t-SNE: PCA initialisation, perplexity capped below
    N / 3 for small sets. UMAP: 15 neighbours, cosine metric."""
    features = np.asarray(features, dtype=np.float32)
    if len(features) < 3:
        raise ValueError(f"a 2-D map needs at least 3 samples, got {len(features)}")
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(perplexity, (len(features) - 1) / 3)
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise MissingBackendError("--method umap needs umap-learn: pip install 'hf_dino[umap]' "
                                      "(or use --method tsne)") from None
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(features) - 1), metric="cosine",
                            random_state=seed)
        return reducer.fit_transform(features)
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


def label_colours(num_classes: int) -> list:
    """Distinct colours: tab10 up to 10 classes, tab20 up to 20, then an evenly spaced hue wheel."""
    import matplotlib

    if num_classes <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(num_classes)]
    if num_classes <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(num_classes)]
    return [matplotlib.colormaps["hsv"](i / num_classes) for i in range(num_classes)]


def plot_embedding_map(coordinates: np.ndarray, labels: Sequence[int], class_names: Sequence[str] | None,
                       output: str | Path, title: str = "") -> Path:
    """Scatter of coordinates (N, 2) coloured by label with a legend of class names; PNG at 150 dpi.
    Legends with more than 30 classes are left out (the colours stay)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels)
    present = np.unique(labels)
    names = list(class_names) if class_names else [str(label) for label in range(int(present.max()) + 1)]
    colours = label_colours(int(present.max()) + 1)
    figure, axes = plt.subplots(figsize=(9, 7.5), dpi=150)
    for label in present:
        chosen = labels == label
        axes.scatter(coordinates[chosen, 0], coordinates[chosen, 1], s=6, alpha=0.75, color=colours[int(label)],
                     label=names[int(label)] if int(label) < len(names) else str(label), linewidths=0)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(textwrap.fill(title, 70), fontsize=11)  # a long title wraps instead of running off the image
    if len(present) <= 30:
        axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, markerscale=3,
                    fontsize=9, title="class")
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    plt.close(figure)
    return output


def map_quality(features: np.ndarray, coordinates: np.ndarray, labels: np.ndarray) -> dict:
    """Silhouette of the labels in feature space (cosine) and on the map, plus the map's
    trustworthiness (5 neighbours): numbers that say whether the picture shows real structure."""
    from sklearn.manifold import trustworthiness
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    result = {"trustworthiness": round(float(trustworthiness(features, coordinates, n_neighbors=5)), 4)}
    if 1 < len(np.unique(labels)) < len(labels):
        result["silhouette_features"] = round(float(silhouette_score(features, labels, metric="cosine")), 4)
        result["silhouette_map"] = round(float(silhouette_score(coordinates, labels)), 4)
    return result
