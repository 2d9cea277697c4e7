"""Streaming feature extraction, the safetensors feature cache and block-wise search, checked
against whole-matrix computations (full similarity, numpy's stable argsort)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hf_dino.evaluation.search import (UnreadableImageError, cached_features, chunked_topk, faiss_available,
                                       faiss_topk, ranking_positions, stream_features, to_normalised_tensor)


def test_chunked_topk_equals_the_whole_similarity_topk():
    generator = torch.Generator().manual_seed(0)
    queries, database = torch.randn(7, 5, generator=generator), torch.randn(103, 5, generator=generator)
    full_scores, full_indices = (queries @ database.T).topk(20, dim=1)
    for block_size in (1, 8, 50, 1000):
        scores, indices = chunked_topk(queries, database, 20, block_size=block_size)
        torch.testing.assert_close(scores, full_scores)
        assert torch.equal(indices, full_indices)
    scores, indices = chunked_topk(queries, database[:4], 20, block_size=3)  # fewer rows than k
    assert indices.shape == (7, 4) and torch.equal(indices, (queries @ database[:4].T).topk(4, dim=1).indices)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_topk_agrees():
    generator = torch.Generator().manual_seed(1)
    queries, database = torch.randn(5, 8, generator=generator), torch.randn(60, 8, generator=generator)
    _, expected = chunked_topk(queries, database, 10, block_size=7)
    _, indices = faiss_topk(queries, database, 10)
    assert torch.equal(indices, expected)


def test_ranking_positions_match_a_full_stable_argsort():
    # small integers: every inner product is exact in float32 whatever the summation order, so the
    # many ties are real ties (broken by database index, as a stable argsort breaks them)
    rng = np.random.default_rng(0)
    database = torch.from_numpy(rng.integers(-3, 4, size=(57, 6)).astype(np.float32))
    database[40] = database[3]
    database[41] = database[3]
    database[12] = database[50]
    queries = torch.from_numpy(rng.integers(-3, 4, size=(4, 6)).astype(np.float32))
    items = [np.array([3, 40, 41, 0]), np.array([50, 12]), np.arange(57), np.array([], dtype=np.int64)]
    scores = (queries @ database.T).numpy()
    for block_size in (5, 16, 41, 1000):
        positions = ranking_positions(queries, database, items, block_size=block_size)
        for query, query_items in enumerate(items):
            order = np.argsort(-scores[query], kind="stable")
            expected = np.argsort(order)[query_items]
            np.testing.assert_array_equal(positions[query], expected)


class MeanColour(nn.Module):
    """Stand-in backbone: the per-channel mean of the image, (B, 3, H, W) -> (B, 3)."""

    def forward(self, pixel_values):
        return pixel_values.mean(dim=(2, 3))


def write_images(folder, colours):
    paths = []
    for index, colour in enumerate(colours):
        path = folder / f"{index:03d}.png"
        Image.new("RGB", (12 + index, 9), colour).save(path)
        paths.append(path)
    return paths


def test_stream_features_in_file_order_with_workers(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30), (200, 100, 50)]
    paths = write_images(tmp_path, colours)
    square = lambda image: to_normalised_tensor(image.resize((8, 8)))  # noqa: E731
    features = stream_features(MeanColour(), paths, square, lambda model, x: model(x), batch_size=2,
                               num_workers=2, disable_progress=True)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = (np.array(colours) / 255.0 - mean) / std
    np.testing.assert_allclose(features.numpy(), expected, atol=1e-5)


def test_unreadable_image_is_named(tmp_path):
    paths = write_images(tmp_path, [(1, 2, 3), (4, 5, 6)])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        stream_features(MeanColour(), [*paths, broken], lambda image: to_normalised_tensor(image.resize((4, 4))),
                        lambda model, x: model(x), batch_size=2, disable_progress=True)


def test_feature_cache_reuses_and_separates_keys(tmp_path):
    calls = []
    paths = ["a.jpg", "b.jpg"]

    def compute(value):
        def run():
            calls.append(value)
            return torch.full((2, 3), float(value))
        return run

    first = cached_features(tmp_path, "db", {"model": "m1"}, paths, compute(1))
    again = cached_features(tmp_path, "db", {"model": "m1"}, paths, compute(2))
    other_model = cached_features(tmp_path, "db", {"model": "m2"}, paths, compute(3))
    other_files = cached_features(tmp_path, "db", {"model": "m1"}, ["a.jpg", "c.jpg"], compute(4))
    assert calls == [1, 3, 4]
    assert torch.equal(first, again) and other_model[0, 0] == 3 and other_files[0, 0] == 4
    assert len(list(tmp_path.glob("db-*.safetensors"))) == 3 and not list(tmp_path.glob("*.partial"))
