import logging

import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import AutoImageProcessor

from hf_dino.hub import build_image_processor, push_folder, render_model_card
from hf_dino.recipe import DinoRecipe

RESULTS = {"knn": {"k": 20, "temperature": 0.07, "top1": 41.25, "top5": 88.0, "num_val": 1000, "num_train": 5000},
           "train_time_s": 420.0, "global_step": 234}


def test_card_metadata_parses_and_holds_the_run():
    recipe = DinoRecipe(arch="vit_tiny", patch_size=4, global_crop_size=32, hub_model_id="me/dino-tiny")
    card = ModelCard(str(render_model_card(recipe, RESULTS, "ViTModel")))
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-feature-extraction"
    assert {"dino", "self-supervised", "vit_tiny"} <= set(data["tags"]) and data["widget"][0]["src"].startswith("https://")
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "dino-tiny" and results[0].metric_value == 41.25
    assert 'AutoModel.from_pretrained("me/dino-tiny")' in card.text
    assert "| `patch_size` | `4` |" in card.text and "234 optimizer steps in 7.0 min" in card.text
    assert "@inproceedings{caron2021emerging" in card.text


def test_card_without_evaluation():
    card = ModelCard(str(render_model_card(DinoRecipe(), {"global_step": 5}, "ViTModel")))
    assert "model-index" not in card.data.to_dict()
    assert "No evaluation was run" in card.text


def test_image_processor_matches_training_normalisation(tmp_path):
    build_image_processor(DinoRecipe(global_crop_size=32)).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    pixel_values = processor(images=torch.full((3, 50, 40), 255, dtype=torch.uint8), return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 32, 32)
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixel_values[0, :, 0, 0], expected, rtol=1e-4, atol=1e-4)


def test_failed_push_is_reported_not_raised(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert push_folder(tmp_path, "someone/some-model") is False
    assert "someone/some-model failed" in caplog.text


def tiny_teacher_backbone(tmp_path):
    from hf_dino.hub import save_teacher_backbone
    from hf_dino.trainer import build_student_and_teacher

    recipe = DinoRecipe(arch="vit_tiny", patch_size=8, num_hidden_layers=2, global_crop_size=32, local_crop_size=16,
                        out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
    _, teacher = build_student_and_teacher(recipe)
    return teacher, save_teacher_backbone(teacher, tmp_path / "teacher_backbone", recipe, {"global_step": 1})


def test_teacher_backbone_fine_tunes_as_vit_for_image_classification(tmp_path):
    """The path of docs/FINETUNING.md: ViTForImageClassification from the teacher backbone, Trainer steps."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image, Value
    from PIL import Image as PILImage
    from transformers import Trainer, TrainingArguments, ViTForImageClassification

    teacher, backbone_dir = tiny_teacher_backbone(tmp_path)
    model = ViTForImageClassification.from_pretrained(backbone_dir, num_labels=3)
    for name, value in teacher.backbone.state_dict().items():  # the encoder is DINO's, unchanged
        torch.testing.assert_close(model.vit.state_dict()[name], value)
    processor = AutoImageProcessor.from_pretrained(backbone_dir)
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)) for _ in range(8)]
    data = Dataset.from_dict({"image": images, "label": [i % 3 for i in range(8)]},
                             features=Features({"image": Image(), "label": ClassLabel(num_classes=3)}))
    data = data.with_transform(lambda batch: {"pixel_values": processor(batch["image"])["pixel_values"],
                                              "label": batch["label"]})

    def collate(rows):
        return {"pixel_values": torch.stack([torch.as_tensor(np.asarray(r["pixel_values"])) for r in rows]),
                "labels": torch.tensor([r["label"] for r in rows])}

    before = model.classifier.weight.detach().clone()
    trainer = Trainer(model=model, train_dataset=data, data_collator=collate,
                      args=TrainingArguments(output_dir=str(tmp_path / "ft"), per_device_train_batch_size=4,
                                             max_steps=2, report_to="none", save_strategy="no",
                                             remove_unused_columns=False, use_cpu=True))
    assert trainer.train().global_step == 2
    assert not torch.equal(model.classifier.weight, before)


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records what each upload would send."""

    def __init__(self, fail=False, gate=None):
        self.fail, self.gate, self.uploads, self.repos = fail, gate, [], []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.repos.append((repo_id, private))

    def upload_folder(self, folder_path, repo_id, commit_message):
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail:
            raise ConnectionError("Hub unreachable")
        from pathlib import Path
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        card = ModelCard.load(folder / "README.md") if (folder / "README.md").exists() else None
        self.uploads.append({"repo_id": repo_id, "message": commit_message, "files": files, "card": card})


def test_pusher_uploads_in_the_background_from_a_staged_copy(tmp_path):
    import threading

    from hf_dino.hub import HubPusher

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    gate = threading.Event()
    api = RecordingApi(gate=gate)
    pusher = HubPusher("me/model", private=True, api=api)
    future = pusher.push(tmp_path / "model", "step 1")
    assert not future.done()  # the upload blocks on the network; push() did not
    import shutil
    shutil.rmtree(tmp_path / "model")  # e.g. the checkpoint is rotated away meanwhile
    gate.set()
    assert pusher.wait() == {"repo_id": "me/model", "succeeded": 1, "failed": 0}
    assert api.repos == [("me/model", True)] and api.uploads[0]["files"] == ["config.json"]


def test_pusher_failures_are_counted_and_logged(tmp_path, caplog):
    from hf_dino.hub import HubPusher

    (tmp_path / "config.json").write_text("{}")
    pusher = HubPusher("me/model", api=RecordingApi(fail=True))
    with caplog.at_level(logging.WARNING):
        pusher.push(tmp_path, "a")
        pusher.push(tmp_path, "b")
        assert pusher.wait()["failed"] == 2
    assert "Hub unreachable" in caplog.text


def test_push_run_renders_evaluations_into_the_card(tmp_path, monkeypatch):
    import json

    import huggingface_hub

    from hf_dino.hub import push_run

    _, backbone_dir = tiny_teacher_backbone(tmp_path)
    recipe = DinoRecipe(arch="vit_tiny", patch_size=8, num_hidden_layers=2, global_crop_size=32, local_crop_size=16)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe.to_dict()))
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    api = RecordingApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    linear = {"top1": 55.5, "top5": 94.0, "epochs": 100, "lr": 0.01}
    assert push_run(tmp_path, "me/dino-tiny", extra_results={"linear": linear})
    upload = api.uploads[0]
    assert upload["files"] == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    _, results = model_index_to_eval_results(upload["card"].data.to_dict()["model-index"])
    assert sorted(r.metric_value for r in results) == [41.25, 55.5]
    assert 'AutoModel.from_pretrained("me/dino-tiny")' in upload["card"].text
