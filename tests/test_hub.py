import json
import logging

import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image as PILImage
from transformers import AutoImageProcessor, ViTModel

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


def test_image_processor_resizes_the_shortest_edge_then_centre_crops_like_the_evaluation_transform(tmp_path):
    """The reference's evaluation geometry (Resize(256) + CenterCrop(224), scaled to the crop size;
    the k-NN transform of `hf_dino.transforms`, albumentations/OpenCV): no squashing."""
    import numpy as np

    from hf_dino.transforms import evaluation_transform

    build_image_processor(DinoRecipe(global_crop_size=32)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["size"] == {"shortest_edge": 37} and config["crop_size"] == {"height": 32, "width": 32}  # round(32*256/224)
    assert config["do_convert_rgb"] and config["do_center_crop"] and config["resample"] == 3  # PIL bicubic
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    # 90 x 45 (W x H): source columns 0..19 black, the rest white. Shortest edge 45 -> 37 gives
    # 74 x 37; the centre crop keeps columns 21..52 of 74, i.e. source columns 25.5..64.4: all white
    # (the edge, at resized column 16.4, is beyond the bicubic kernel's reach). Squashing to 32 x 32
    # would keep columns 0..6 black.
    image = np.full((45, 90, 3), 255, dtype=np.uint8)
    image[:, :20] = 0
    white = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    pixels = processor(images=PILImage.fromarray(image), return_tensors="pt").pixel_values[0]
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels, white[:, None, None].expand(3, 32, 32), rtol=0, atol=0.03)
    # a smooth non-square image: the same pixels as the evaluation transform, up to the two libraries'
    # bicubic kernels (PIL a=-0.5, OpenCV a=-0.75)
    rows, columns = np.mgrid[0:45, 0:60]
    smooth = np.stack([127 + 120 * np.sin(rows / 9.0), 127 + 120 * np.cos(columns / 11.0),
                       127 + 100 * np.sin((rows + columns) / 13.0)], -1).astype(np.uint8)
    ours = processor(images=PILImage.fromarray(smooth), return_tensors="pt").pixel_values[0]
    expected = evaluation_transform(32)(image=smooth)["image"]
    assert (ours - expected).abs().max().item() < 0.06 and (ours - expected).abs().mean().item() < 0.01


def test_image_processor_keeps_the_256_224_ratio_at_the_papers_size():
    config = build_image_processor(DinoRecipe(global_crop_size=224)).to_dict()
    assert config["size"] == {"shortest_edge": 256} and config["crop_size"] == {"height": 224, "width": 224}


def test_card_keeps_org_dataset_ids_and_names_the_base_model():
    recipe = DinoRecipe(dataset_name="uoft-cs/cifar10", dataset_config_name="plain_text",
                        init_backbone="facebook/dino-vits16", hub_model_id="me/dino-cifar")
    data = ModelCard(str(render_model_card(recipe, RESULTS, "ViTModel"))).data.to_dict()
    assert data["datasets"] == ["uoft-cs/cifar10"] and data["base_model"] == "facebook/dino-vits16"
    dataset = data["model-index"][0]["results"][0]["dataset"]
    assert dataset["type"] == "uoft-cs/cifar10" and dataset["config"] == "plain_text"
    demo = ModelCard(str(render_model_card(DinoRecipe(), RESULTS, "ViTModel"))).data.to_dict()  # embedded sample
    assert demo["datasets"] == ["uoft-cs/cifar10"] and "base_model" not in demo


def test_card_never_contains_local_paths(tmp_path):
    for folder in ("images", "init_weights", "run"):
        (tmp_path / folder).mkdir()
    recipe = DinoRecipe(dataset_name=str(tmp_path / "images"), init_backbone=str(tmp_path / "init_weights"),
                        output_dir=str(tmp_path / "run"))
    results = dict(RESULTS, linear={"top1": 50.0, "top5": 90.0, "model": str(tmp_path / "run")})
    text = str(render_model_card(recipe, results, "ViTModel"))
    assert str(tmp_path) not in text and "init_weights" not in text and "images`" not in text
    data = ModelCard(text).data.to_dict()
    assert "datasets" not in data and "base_model" not in data
    assert "Continued DINO pretraining from local weights" in text and "a local image dataset" in text


def test_card_links_a_space_only_when_given_one():
    with_space = str(render_model_card(DinoRecipe(), RESULTS, "ViTModel", space_id="me/dino-demo"))
    assert "(https://huggingface.co/spaces/me/dino-demo)" in with_space
    assert "huggingface.co/spaces" not in str(render_model_card(DinoRecipe(), RESULTS, "ViTModel"))


def test_failed_push_is_reported_not_raised(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert push_folder(tmp_path, "someone/some-model") is False
    assert "someone/some-model failed" in caplog.text


def tiny_teacher_backbone(tmp_path):
    from hf_dino.hub import save_teacher_backbone
    from hf_dino.student_teacher import build_student_and_teacher

    recipe = DinoRecipe(arch="vit_tiny", patch_size=8, num_hidden_layers=2, global_crop_size=32, local_crop_size=16,
                        out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
    _, teacher = build_student_and_teacher(recipe)
    return teacher, save_teacher_backbone(teacher, tmp_path / "teacher_backbone", recipe, {"global_step": 1})


def test_feature_extraction_pipeline_pools_the_dino_feature(tmp_path):
    """`pipeline("image-feature-extraction", pool=True)` on the saved folder returns the teacher's
    DINO feature (final-norm CLS) of the processed image, for RGB, greyscale and RGBA images."""
    import numpy as np
    from transformers import AutoModel, pipeline

    teacher, backbone_dir = tiny_teacher_backbone(tmp_path)
    model, info = AutoModel.from_pretrained(backbone_dir, output_loading_info=True)
    assert type(model) is ViTModel and not any(info.values())  # a plain ViTModel, nothing missing
    assert model.config.pooler_act == "linear"
    extractor = pipeline("image-feature-extraction", model=str(backbone_dir))
    processor = AutoImageProcessor.from_pretrained(backbone_dir)
    rng = np.random.default_rng(0)
    rgb = PILImage.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8))
    for image in (rgb, rgb.convert("L"), rgb.convert("RGBA")):
        pooled = torch.tensor(extractor(image, pool=True))
        pixel_values = processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
        with torch.no_grad():
            dino_feature = teacher.eval().backbone_features(pixel_values)
            last_hidden = model(pixel_values=pixel_values).last_hidden_state
        assert pooled.shape == (1, 192)
        torch.testing.assert_close(pooled, last_hidden[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(pooled, dino_feature, rtol=1e-6, atol=1e-6)
        assert torch.tensor(extractor(image)).shape == (1, 1 + 16, 192)  # without pool: every token


def test_teacher_backbone_saved_at_the_evaluation_size(tmp_path):
    """With `eval_image_size` 64 (trained at 32, patch 8), the saved folder is a plain 64 px ViTModel:
    8 x 8 position embeddings, a processor that crops 64, and on a 64 px image the CLS feature the
    trained teacher computes there with transformers' own `interpolate_pos_encoding`."""
    import numpy as np
    from transformers import AutoModel

    from hf_dino.hub import save_teacher_backbone
    from hf_dino.student_teacher import build_student_and_teacher

    recipe = DinoRecipe(arch="vit_tiny", patch_size=8, num_hidden_layers=2, global_crop_size=32, local_crop_size=16,
                        out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, eval_image_size=64)
    _, teacher = build_student_and_teacher(recipe)
    with torch.no_grad():  # a trained-looking, non-smooth position grid, so that resampling matters
        teacher.backbone.embeddings.position_embeddings.normal_()
    backbone_dir = save_teacher_backbone(teacher, tmp_path / "teacher_backbone", recipe, {"global_step": 1})
    model, info = AutoModel.from_pretrained(backbone_dir, output_loading_info=True)
    assert type(model) is ViTModel and not any(info.values())
    assert model.config.image_size == 64 and model.embeddings.position_embeddings.shape == (1, 1 + 64, 192)
    processor = AutoImageProcessor.from_pretrained(backbone_dir)
    image = PILImage.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    pixel_values = processor(images=image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 64, 64)
    with torch.no_grad():
        saved = model.eval()(pixel_values=pixel_values).pooler_output
        trained = teacher.eval().backbone(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state[:, 0]
        at_32 = teacher.backbone(pixel_values=torch.nn.functional.interpolate(pixel_values, size=32)).last_hidden_state[:, 0]
    torch.testing.assert_close(saved, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(saved, at_32, atol=1e-3)  # the resolution is not a no-op
    card = (backbone_dir / "README.md").read_text()
    assert "centre crop 64×64" in card


def test_teacher_backbone_fine_tunes_as_vit_for_image_classification(tmp_path):
    """The path of docs/FINETUNING.md: ViTForImageClassification from the teacher backbone, Trainer steps."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
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
    assert push_run(tmp_path, "me/dino-tiny", extra_results={"linear": linear}, space_id="me/dino-app")
    upload = api.uploads[0]
    assert upload["files"] == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    _, results = model_index_to_eval_results(upload["card"].data.to_dict()["model-index"])
    assert sorted(r.metric_value for r in results) == [41.25, 55.5]
    assert 'AutoModel.from_pretrained("me/dino-tiny")' in upload["card"].text
    assert "https://huggingface.co/spaces/me/dino-app" in upload["card"].text


def test_cifar_resnet_teacher_backbone_card_and_pipeline_use_its_remote_code(tmp_path):
    """A CIFAR-stem ResNet's teacher_backbone/: its code beside the weights, a card that loads it with
    `trust_remote_code=True`, and `pipeline(..., pool=True)` returning the teacher's pooled feature."""
    import numpy as np
    from transformers import pipeline

    from hf_dino.hub import save_teacher_backbone
    from hf_dino.student_teacher import build_student_and_teacher

    recipe = DinoRecipe(arch="resnet18", resnet_stem="cifar", hidden_size=8, global_crop_size=32, local_crop_size=16,
                        out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
    _, teacher = build_student_and_teacher(recipe)
    backbone_dir = save_teacher_backbone(teacher, tmp_path / "teacher_backbone", recipe, {"global_step": 1})
    assert (backbone_dir / "modeling_cifar_resnet.py").exists()
    card = (backbone_dir / "README.md").read_text()
    assert 'from_pretrained("path/to/teacher_backbone", trust_remote_code=True)' in card
    assert "small-image (CIFAR) stem" in card
    vit_card = str(render_model_card(DinoRecipe(), RESULTS, "ViTModel"))
    assert "trust_remote_code" not in vit_card
    extractor = pipeline("image-feature-extraction", model=str(backbone_dir), trust_remote_code=True)
    image = PILImage.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    pooled = torch.tensor(extractor(image, pool=True)).flatten(1)
    pixel_values = AutoImageProcessor.from_pretrained(backbone_dir)(images=image, return_tensors="pt").pixel_values
    assert pixel_values.shape[-2:] == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pooled, teacher.eval().backbone_features(pixel_values), rtol=1e-5, atol=1e-6)
