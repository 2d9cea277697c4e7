"""2-D embedding maps: t-SNE keeps separated clusters apart, the PNG shows every class colour,
UMAP when installed (a clear message when not), and the command on the embedded demo data."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

import conftest
from hf_dino.evaluation.embedding_map import (MissingBackendError, embed_2d, label_colours, map_quality,
                                              plot_embedding_map, subsample_indices)


def three_clusters(per_class=25, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, dim)) * 10
    features = np.concatenate([centre + rng.standard_normal((per_class, dim)) for centre in centres])
    return features.astype(np.float32), np.repeat(np.arange(3), per_class)


def test_subsample_indices():
    chosen = subsample_indices(1000, 50, seed=3)
    assert len(chosen) == 50 and len(set(chosen)) == 50 and np.all(np.diff(chosen) > 0) and chosen.max() < 1000
    np.testing.assert_array_equal(chosen, subsample_indices(1000, 50, seed=3))
    np.testing.assert_array_equal(subsample_indices(7, 50), np.arange(7))


def test_tsne_keeps_separated_clusters_apart():
    features, labels = three_clusters()
    coordinates = embed_2d(features, "tsne", seed=0)
    assert coordinates.shape == (75, 2)
    quality = map_quality(features, coordinates, labels)
    assert quality["silhouette_map"] > 0.7 and quality["trustworthiness"] > 0.9


def test_png_shows_every_class_in_its_colour(tmp_path):
    features, labels = three_clusters()
    coordinates = embed_2d(features, "tsne", seed=0)
    output = plot_embedding_map(coordinates, labels, ["airplane", "bird", "cat"], tmp_path / "map.png", "test map")
    image = np.asarray(Image.open(output).convert("RGB")).reshape(-1, 3).astype(int)
    assert Image.open(output).size == (1350, 1125)
    for colour in label_colours(3):
        rgb = np.round((0.75 * np.array(colour[:3]) + 0.25) * 255).astype(int)  # alpha 0.75 on white
        assert (np.abs(image - rgb).sum(axis=1) < 12).sum() > 50, f"class colour {rgb} missing"


@pytest.mark.slow  # umap-learn's first call compiles with numba (~40 s)
def test_umap_map_when_installed():
    pytest.importorskip("umap")
    features, labels = three_clusters(per_class=10)
    coordinates = embed_2d(features, "umap", seed=0)
    assert coordinates.shape == (30, 2) and map_quality(features, coordinates, labels)["silhouette_map"] > 0.7


def test_umap_missing_gives_a_clear_message(monkeypatch):
    features, _ = three_clusters(per_class=10)
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    with pytest.raises(MissingBackendError, match=r"pip install 'hf_dino\[umap\]'"):
        embed_2d(features, "umap")


def test_command_on_the_demo_data(tmp_path, capsys):
    
    from hf_dino.commands.plot_embeddings import main

    conftest.tiny_vit(image_size=32, patch_size=8, save_to=tmp_path / "vit")
    output = tmp_path / "map.png"
    main(["--model", str(tmp_path / "vit"), "--output", str(output), "--max_samples", "60", "--resize_ratio", "1",
          "--num_workers", "0", "--output_json", str(tmp_path / "map.json")])
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{"):])
    assert result["num_samples"] == 60 and result["method"] == "tsne"
    assert json.loads((tmp_path / "map.json").read_text()) == result
    assert Image.open(output).size == (1350, 1125)


def test_command_rejects_a_non_png_output(tmp_path, capsys):
    from hf_dino.commands.plot_embeddings import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "unused", "--output", str(tmp_path / "map.jpg")])
    assert exit_info.value.code == 2 and "must be a .png" in capsys.readouterr().err
