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


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height black pixels, a few kB on disk: its header
    declares every pixel, its zlib stream inflates to height * (1 + width / 8) bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0, then the packed pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_images_above_the_pixel_budget_are_refused_from_their_header(monkeypatch):
    """A 12000 x 12000 PNG (144 MP, a few kB) is refused before any pixel is decoded; the same
    file decodes under a budget that admits it."""
    from PIL import ImageFile

    from hf_dino.data import DEFAULT_MAX_IMAGE_PIXELS, read_image

    bomb = png_bomb(12000, 12000)
    assert len(bomb) < 100_000 and DEFAULT_MAX_IMAGE_PIXELS == 100_000_000
    decoded_pixels = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded_pixels.append(image.size) or original_load(image))
    image, reason = read_image({"bytes": bomb, "path": None})
    assert image is None and reason == "12000x12000 pixels, above max_image_pixels=100000000"
    assert decoded_pixels == []  # refused from the header
    small = png_bomb(300, 200)
    assert read_image(small, max_pixels=60_000)[0].shape == (200, 300, 3)
    assert read_image(small, max_pixels=59_999) == (None, "300x200 pixels, above max_image_pixels=59999")
    assert decode_image(small, max_pixels=None).shape == (200, 300, 3)


def test_a_budget_above_pillows_own_guard_is_honoured_and_the_guard_restored(monkeypatch):
    """Pillow refuses images above 2 x Image.MAX_IMAGE_PIXELS; an explicit larger budget lifts that
    for the image being opened only."""
    from hf_dino.data import read_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above 2000 pixels
    image = png_bomb(60, 50)  # 3000 pixels
    assert read_image(image, max_pixels=None)[0] is None  # no budget: Pillow's guard stands
    assert read_image(image, max_pixels=4000)[0].shape == (50, 60, 3)
    assert read_image(image, max_pixels=2500) == (None, "60x50 pixels, above max_image_pixels=2500")
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_importing_hf_dino_leaves_pillows_guard_as_pillow_sets_it():
    import subprocess
    import sys

    code = ("from PIL import Image; default = Image.MAX_IMAGE_PIXELS; import hf_dino.data, hf_dino.trainer, "
            "hf_dino.demo.app; assert Image.MAX_IMAGE_PIXELS == default == int(1024 * 1024 * 1024 // 4 // 3), "
            "Image.MAX_IMAGE_PIXELS")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]


def write_stream(folder, num_shards: int = 3, per_shard: int = 14) -> list[int]:
    """Parquet shards of 20 x 20 PNGs whose uniform grey level identifies each; returns the levels."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    folder.mkdir(parents=True)
    levels = []
    for shard in range(num_shards):
        shard_levels = [5 * (shard * per_shard + i) % 256 for i in range(per_shard)]
        levels += shard_levels
        images = [{"bytes": encode(Image.fromarray(np.full((20, 20, 3), level, np.uint8))), "path": None}
                  for level in shard_levels]
        datasets.Dataset.from_dict({"image": images, "label": [level % 2 for level in shard_levels]},
                                   features=features).to_parquet(str(folder / f"train-{shard:05d}-of-{num_shards:05d}.parquet"))
    return levels


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_streamed_epoch_resumes_exactly_from_the_saved_position_without_decoding_the_past(tmp_path, num_workers,
                                                                                            decoded):
    """StatefulDataLoader over StreamingMultiCropDataset (blocks of 5 examples, 3 shards): stopped
    after 4 batches and resumed from `state_dict()` in a new loader, the epoch continues with the
    very batches (same images, same crops) of the uninterrupted epoch; with workers in the main
    process, the resumed loader decodes exactly the images of the remaining batches."""
    import hf_dino.data as data_module
    from torchdata.stateful_dataloader import StatefulDataLoader

    levels = write_stream(tmp_path / "stream")
    augmentation = MultiCropAugmentation(global_crop_size=8, local_crop_size=4, local_crops_number=1)

    def loader():
        stream = load_dataset_dict(str(tmp_path / "stream"), streaming=True)["train"]
        dataset = data_module.StreamingMultiCropDataset(stream, augmentation, seed=3, shuffle_buffer_size=5)
        dataset.set_epoch(1)
        return StatefulDataLoader(dataset, batch_size=3, drop_last=True, num_workers=num_workers,
                                  collate_fn=collate_multicrop)

    uninterrupted = [batch["crops"] for batch in loader()]
    decoded_uninterrupted = list(decoded)
    # workers split the 3 shards (2 + 1): each drops its own incomplete last batch
    assert len(uninterrupted) == (42 // 3 if num_workers == 0 else 28 // 3 + 14 // 3)
    interrupted = loader()
    iterator = iter(interrupted)
    for _ in range(4):
        next(iterator)
    state = interrupted.state_dict()
    del iterator
    resumed_loader = loader()
    resumed_loader.load_state_dict(state)
    decoded.clear()
    resumed = [batch["crops"] for batch in resumed_loader]
    assert len(resumed) == len(uninterrupted) - 4
    for expected, again in zip(uninterrupted[4:], resumed, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(expected, again))
    if num_workers == 0:  # decodes happen in training order: the resumed loader decodes the rest, and only it
        assert sorted(decoded_uninterrupted) == sorted(levels)
        assert decoded == decoded_uninterrupted[4 * 3:]
