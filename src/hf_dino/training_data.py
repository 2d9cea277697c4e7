"""The data of a pretraining run: its splits, the multi-crop training dataset and its DataLoader,
for the processes of an Accelerator."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .data import (MultiCropDataset, StreamingMultiCropDataset, collate_multicrop, first_examples, load_dataset_dict,
                   select_split, streamed_split_length)
from .recipe import DinoRecipe
from .transforms import MultiCropAugmentation


@dataclass
class TrainingData:
    """What a pretraining run reads: every split (the held-out one serves the k-NN evaluations),
    the multi-crop training dataset, its DataLoader and the batches of an epoch on each process."""

    dataset_dict: Any
    train_dataset: MultiCropDataset | StreamingMultiCropDataset
    dataloader: Iterable[dict]
    batches_per_epoch: int


def build_training_data(recipe: DinoRecipe, accelerator) -> TrainingData:
    """The data of `recipe` for the processes of `accelerator` (an `accelerate.Accelerator`).

    Map-style data is shuffled by a seeded sampler that Accelerate shards over the processes;
    a streamed split (`recipe.streaming`) is split across processes by `StreamingMultiCropDataset`
    and needs a length (its metadata's, or `--max_train_samples`) to define an epoch."""
    dataset_dict = load_dataset_dict(recipe.dataset_name, streaming=recipe.streaming,
                                     config_name=recipe.dataset_config_name)
    train_split = select_split(dataset_dict, recipe.train_split)
    augmentation = MultiCropAugmentation(
        global_crop_size=recipe.global_crop_size, local_crop_size=recipe.local_crop_size,
        global_crops_scale=recipe.global_crops_scale, local_crops_scale=recipe.local_crops_scale,
        local_crops_number=recipe.local_crops_number, params=recipe.augmentation_params())
    loader_kwargs = dict(batch_size=recipe.batch_size_per_device, drop_last=True, num_workers=recipe.num_workers,
                         collate_fn=collate_multicrop, pin_memory=accelerator.device.type == "cuda",
                         # Workers live for the whole run; the epoch reaches them through shared memory.
                         persistent_workers=recipe.num_workers > 0,
                         prefetch_factor=4 if recipe.num_workers > 0 else None)
    if recipe.streaming:
        num_examples = streamed_split_length(train_split)
        if recipe.max_train_samples is not None:
            train_split = first_examples(train_split, recipe.max_train_samples)
            num_examples = min(num_examples or recipe.max_train_samples, recipe.max_train_samples)
        if num_examples is None:
            raise ValueError("The streamed split does not declare its length, so an epoch is undefined: "
                             "pass --max_train_samples N (one epoch = N images).")
        train_dataset = StreamingMultiCropDataset(
            train_split, augmentation, recipe.image_column, seed=recipe.seed,
            shuffle_buffer_size=recipe.shuffle_buffer_size, rank=accelerator.process_index,
            world_size=accelerator.num_processes, max_pixels=recipe.max_image_pixels)
        # Not prepared by Accelerate: the stream is already split across processes. Stateful: a
        # checkpoint records each worker's stream position (`StreamingMultiCropDataset.state_dict`).
        from torchdata.stateful_dataloader import StatefulDataLoader

        dataloader = StatefulDataLoader(train_dataset, **loader_kwargs)
        batches_per_epoch = num_examples // accelerator.num_processes // recipe.batch_size_per_device
    else:
        if recipe.max_train_samples is not None:
            train_split = first_examples(train_split, recipe.max_train_samples)
        train_dataset = MultiCropDataset(train_split, augmentation, recipe.image_column, seed=recipe.seed,
                                         max_pixels=recipe.max_image_pixels)
        dataloader = torch.utils.data.DataLoader(train_dataset, shuffle=True,
                                                 generator=torch.Generator().manual_seed(recipe.seed),
                                                 **loader_kwargs)
        dataloader = accelerator.prepare(dataloader)
        batches_per_epoch = len(dataloader)
    if batches_per_epoch < recipe.gradient_accumulation_steps:
        raise ValueError(f"The training split holds fewer than {recipe.gradient_accumulation_steps} batches of "
                         f"{recipe.batch_size_per_device} per process; lower --batch_size_per_device or use more data.")
    return TrainingData(dataset_dict, train_dataset, dataloader, batches_per_epoch)
