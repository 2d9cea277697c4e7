import io

import numpy as np
import pytest
import torch
from PIL import Image

from hf_dino.data import (
    DEMO_DATASET_DIR,
    MultiCropDataset,
    collate_multicrop,
    decode_image,
    load_dataset_dict,
    select_split,
)
from hf_dino.transforms import MultiCropAugmentation


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("P", "PNG"),
                                       ("I;16", "PNG"), ("RGB", "JPEG"), ("LA", "PNG"), ("1", "PNG")])
def test_every_image_mode_becomes_uint8_rgb(mode, fmt):
    image = Image.new(mode, (9, 7))
    decoded = decode_image({"bytes": encode(image, fmt), "path": None})
    assert decoded.shape == (7, 9, 3) and decoded.dtype == np.uint8


def test_sixteen_bit_is_rescaled_not_clipped():
    array = np.full((4, 4), 65535, dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(array)))
    assert decoded.max() == 255 and decoded.min() == 255


def test_transparent_pixels_composite_on_white():
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert (decode_image(encode(image)) == 255).all()


@pytest.mark.parametrize("payload", [b"", b"not an image", encode(Image.new("RGB", (32, 32)), "JPEG")[:60]])
def test_corrupt_images_decode_to_none(payload):
    assert decode_image({"bytes": payload, "path": None}) is None


def test_tiny_and_missing_files(tmp_path):
    assert decode_image(encode(Image.new("RGB", (1, 1)))).shape == (1, 1, 3)
    assert decode_image(str(tmp_path / "missing.jpg")) is None


def test_collate_drops_and_counts_bad_samples():
    good = {"crops": [torch.zeros(3, 4, 4), torch.zeros(3, 2, 2)], "index": 0}
    batch = collate_multicrop([good, {"crops": None, "index": 5}, good])
    assert [tuple(v.shape) for v in batch["crops"]] == [(2, 3, 4, 4), (2, 3, 2, 2)]
    assert batch["num_skipped"] == 1 and batch["skipped_indices"] == [5]


def test_embedded_demo_dataset_loads():
    dataset_dict = load_dataset_dict(None)
    assert DEMO_DATASET_DIR.exists()
    assert len(dataset_dict["train"]) == 10000 and len(dataset_dict["test"]) == 1000
    assert select_split(dataset_dict, "validation", fallbacks=("test",)) is dataset_dict["test"]
    with pytest.raises(KeyError, match="available: train, test"):
        select_split(dataset_dict, "validation")


def test_missing_local_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_dict(str(tmp_path / "nothing"))


def test_multicrop_dataset_crops_depend_on_seed_epoch_and_index():
    train = load_dataset_dict(None)["train"].select(range(4))
    dataset = MultiCropDataset(train, MultiCropAugmentation(32, 16, local_crops_number=1), seed=3)
    first = dataset[1]["crops"]
    assert all(torch.equal(a, b) for a, b in zip(first, dataset[1]["crops"]))
    dataset.set_epoch(1)
    assert not torch.equal(first[0], dataset[1]["crops"][0])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_persistent_workers_follow_the_epoch(context):
    """Workers created once for the whole run still crop each epoch with that epoch's seeds:
    the crops equal those made in this process for (seed, epoch, index)."""
    train = load_dataset_dict(None)["train"].select(range(4))
    dataset = MultiCropDataset(train, MultiCropAugmentation(32, 16, local_crops_number=1), seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=True,
                                         collate_fn=collate_multicrop, multiprocessing_context=context)
    per_epoch = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        from_workers = torch.cat([batch["crops"][0] for batch in loader])
        in_process = torch.stack([dataset[index]["crops"][0] for index in range(4)])
        assert torch.equal(from_workers, in_process)
        per_epoch.append(from_workers)
    assert not torch.equal(per_epoch[0], per_epoch[1])


def test_hub_ids_and_local_paths_are_told_apart():
    from hf_dino.data import looks_like_local_path

    assert not looks_like_local_path("imagenet-1k") and not looks_like_local_path("ILSVRC/imagenet-1k")
    assert looks_like_local_path("./data") and looks_like_local_path("/data/x") and looks_like_local_path("a/b/c")
    assert looks_like_local_path("shards/*.parquet")


def test_streamed_shards_are_split_between_processes(tmp_path):
    """Two parquet shards of different lengths on 2 processes: each process streams its own shard
    (by index in the stream: nothing read twice, nothing lost), in file order with a buffer of 1."""
    import datasets

    from hf_dino.data import StreamingMultiCropDataset

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    values = {0: list(range(6)), 1: list(range(100, 103))}
    for shard, labels in values.items():
        images = [{"bytes": encode(Image.new("RGB", (8, 8), (label % 256, 0, 0))), "path": None} for label in labels]
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(tmp_path / f"train-0000{shard}-of-00002.parquet"))
    stream = load_dataset_dict(str(tmp_path), streaming=True)["train"]
    augmentation = MultiCropAugmentation(8, 8, global_crops_scale=(0.5, 1.0), local_crops_number=0)
    for rank, labels in values.items():
        dataset = StreamingMultiCropDataset(stream, augmentation, rank=rank, world_size=2, shuffle_buffer_size=1)
        assert [row["label"] for row in dataset.dataset] == labels  # its own shard, in file order
        samples = list(dataset)
        assert len(samples) == len(labels) and all(len(sample["crops"]) == 2 for sample in samples)


def test_collate_of_a_batch_without_any_decodable_image():
    batch = collate_multicrop([{"crops": None, "index": 0}, {"crops": None, "index": 1}])
    assert batch == {"crops": [], "num_skipped": 2, "skipped_indices": [0, 1]}
