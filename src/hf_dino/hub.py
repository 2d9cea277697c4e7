"""Hub-facing outputs: the plain teacher backbone folder, its image processor and model card,
and uploads through huggingface_hub."""

from __future__ import annotations

import copy
import json
import logging
import platform
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import BitImageProcessorPil, ViTModel
from transformers.image_utils import PILImageResampling

from .configuration_dino import RESNET_ARCHS
from .modeling_dino import DinoModel
from .recipe import DinoRecipe
from .transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "teacher_backbone.md"
# The repository's model_cards/ (editable installs), else a copy packaged with hf_dino (wheels).
TEMPLATE_DIRS = (Path(__file__).resolve().parents[2] / "model_cards", Path(__file__).parent / "model_cards")
# Example images for the Hub inference widget (the ones transformers' own ViT cards use).
WIDGET_IMAGES = (
    {"src": "https://huggingface.co/datasets/mishig/sample_images/resolve/main/tiger.jpg", "example_title": "Tiger"},
    {"src": "https://huggingface.co/datasets/mishig/sample_images/resolve/main/teapot.jpg", "example_title": "Teapot"},
    {"src": "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/cats.png",
     "example_title": "Cats"},
)
# The embedded demo sample is drawn from CIFAR-10.
DEMO_DATASET_ID = "uoft-cs/cifar10"
# A Hub repository id: `name` or `org/name`.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# The reference's evaluation resize: shortest edge 256 for a 224 centre crop.
EVALUATION_RESIZE_RATIO = 256 / 224


def find_card_template() -> Path:
    for directory in TEMPLATE_DIRS:
        if (directory / TEMPLATE_NAME).exists():
            return directory / TEMPLATE_NAME
    raise FileNotFoundError(f"Model card template {TEMPLATE_NAME} not found in {', '.join(map(str, TEMPLATE_DIRS))}")


def evaluation_resize_size(crop_size: int, resize_ratio: float = EVALUATION_RESIZE_RATIO) -> int:
    """Shortest edge before the centre crop: 256 for a 224 crop, round(crop * 256 / 224) for
    others (37 for the demo's 32), as `transforms.evaluation_transform` resizes for k-NN."""
    return max(crop_size, round(crop_size * resize_ratio))


def evaluation_image_processor(crop_size: int, resize_ratio: float = EVALUATION_RESIZE_RATIO) -> BitImageProcessorPil:
    """The reference's evaluation preprocessing (Resize(256) + CenterCrop(224)), in the processor
    class DINOv2's Hub models use (`BitImageProcessor`): convert to RGB, resize the shortest edge to `crop_size * resize_ratio` (256 for 224; bicubic,
    aspect ratio kept, no squashing), centre-crop `crop_size`, rescale to [0, 1] and normalise with
    the ImageNet statistics used in training: the geometry of `transforms.evaluation_transform`."""
    return BitImageProcessorPil(
        do_convert_rgb=True, do_resize=True, size={"shortest_edge": evaluation_resize_size(crop_size, resize_ratio)},
        resample=PILImageResampling.BICUBIC, do_center_crop=True, crop_size={"height": crop_size, "width": crop_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def build_image_processor(recipe: DinoRecipe) -> BitImageProcessorPil:
    """The image processor of a run's backbone: `evaluation_image_processor` at its evaluation size
    (`recipe.evaluation_image_size`: `eval_image_size`, else the global-crop size)."""
    return evaluation_image_processor(recipe.evaluation_image_size)


def hub_dataset_id(name: str | None) -> str | None:
    """`name` when it is a Hub dataset id (`name` or `org/name`), None for a local path or glob."""
    from .data import looks_like_local_path

    if not name or looks_like_local_path(name) or not HUB_ID.fullmatch(name):
        return None
    return name


def hub_model_id(name: str | None) -> str | None:
    """`name` when it is a Hub model id (`org/name`, or a legacy `name`), None for a local folder."""
    return hub_dataset_id(name)


def _public(value):
    """A recipe value fit for a public card: local paths (and lists holding some) become "local"."""
    from .data import looks_like_local_path

    if isinstance(value, str) and looks_like_local_path(value):
        return "(local path)"
    if isinstance(value, (list, tuple)):
        return type(value)(_public(item) for item in value)
    return value


def render_model_card(recipe: DinoRecipe, results: dict, backbone_class: str, repo_id: str | None = None,
                      space_id: str | None = None) -> ModelCard:
    """Fill `model_cards/teacher_backbone.md` from a run's recipe and results.

    Metadata: `pipeline_tag: image-feature-extraction`, widget example images, the training data's
    Hub id (`datasets`, `org/name` kept), `base_model` when training continued from Hub weights
    (`recipe.init_backbone`), and a model-index with the measured k-NN / linear-probe results.
    Local paths (data, init weights) never reach the card. `space_id` (`org/name` of a Hub Space
    running hf_dino's demo app) adds a "Try it" link.
    """
    if recipe.dataset_name is None:
        dataset_id, dataset = DEMO_DATASET_ID, f"CIFAR-10 ({DEMO_DATASET_ID}; hf_dino's embedded 10,000-image sample)"
    else:
        dataset_id = hub_dataset_id(recipe.dataset_name)
        dataset = dataset_id or "a local image dataset"
    base_model = hub_model_id(recipe.init_backbone)
    repo_id = repo_id or recipe.hub_model_id or "path/to/teacher_backbone"
    knn, linear = results.get("knn"), results.get("linear")
    eval_results, evaluation_lines = [], []
    metric_fields = dict(task_type="image-classification", dataset_type=dataset_id or "imagefolder",
                         dataset_name=dataset, dataset_config=recipe.dataset_config_name if dataset_id else None,
                         metric_type="accuracy")
    if knn:
        eval_results.append(EvalResult(
            **metric_fields, metric_name=f"k-NN top-1 (k={knn['k']})", metric_value=round(knn["top1"], 2),
            dataset_split=knn.get("split", recipe.val_split)))
        evaluation_lines.append(
            f"Weighted {knn['k']}-NN (T={knn['temperature']}) on frozen features at "
            f"{recipe.evaluation_image_size} px: top-1 **{knn['top1']:.2f}%**, "
            f"top-5 {knn['top5']:.2f}% ({knn['num_val']} held-out images, {knn['num_train']} training images as "
            "the memory bank).")
    if linear:
        eval_results.append(EvalResult(
            **metric_fields, metric_name="linear probe top-1", metric_value=round(linear["top1"], 2),
            dataset_split=linear.get("split", recipe.val_split)))
        evaluation_lines.append(
            f"Linear probe on frozen features ({linear.get('epochs', '?')} epochs, lr {linear.get('lr', '?')}): "
            f"top-1 **{linear['top1']:.2f}%**, top-5 {linear['top5']:.2f}%.")
    evaluation_text = "\n\n".join(evaluation_lines) or "No evaluation was run for this checkpoint."
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-feature-extraction", license="apache-2.0",
        tags=["dino", "self-supervised", "vision", "hf_dino", recipe.arch],
        datasets=[dataset_id] if dataset_id else None, base_model=base_model, model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None, widget=[dict(image) for image in WIDGET_IMAGES])
    is_vit = recipe.arch.startswith("vit")
    train = results.get("train", {})
    wall_time = results.get("train_time_s")
    hardware = (torch.cuda.get_device_name() if torch.cuda.is_available()
                else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    if results.get("source"):
        training_text = (f"Converted with hf_dino's `scripts/convert_dino_checkpoint.py` from the reference "
                         f"checkpoint `{Path(results['source']).name}`; the recipe rows come from that run's "
                         "arguments where the checkpoint stores them.")
    else:
        steps = results.get("global_step", train.get("step", "?"))
        start = (f"Continued DINO pretraining from [`{base_model}`](https://huggingface.co/{base_model}). "
                 if base_model else "Continued DINO pretraining from local weights. " if recipe.init_backbone else "")
        training_text = (f"{start}Training data: {dataset}. {steps} optimizer steps in "
                         f"{f'{wall_time / 60:.1f} min' if wall_time else 'an unrecorded time'} on {hardware}.")
    return ModelCard.from_template(
        card_data, template_path=str(find_card_template()),
        model_name=repo_id.split("/")[-1], repo_id=repo_id, backbone_class=backbone_class, space_id=space_id,
        is_vit=is_vit, remote_code=recipe.arch in RESNET_ARCHS and recipe.resnet_stem == "cifar",
        backbone_description=(f"ViT ({recipe.arch}, patch {recipe.patch_size})" if is_vit else recipe.arch),
        feature_expression=("outputs.pooler_output  # the DINO feature, = outputs.last_hidden_state[:, 0]" if is_vit
                            else "outputs.pooler_output.flatten(1)  # the DINO feature"),
        image_size=recipe.evaluation_image_size, resize_size=evaluation_resize_size(recipe.evaluation_image_size),
        evaluation_text=evaluation_text,
        recipe_rows=[(key, _public(value)) for key, value in recipe.to_dict().items()
                     if key not in ("output_dir", "resume_from_checkpoint", "report_to", "push_to_hub")],
        training_text=training_text)


def exportable_vit(backbone: ViTModel, image_size: int) -> ViTModel:
    """The plain `ViTModel` a run saves: a copy of `backbone` whose pooler returns the DINO feature
    unchanged, taking `image_size` px images natively.

    DINO trains no pooler, but `AutoModel.from_pretrained` builds a `ViTModel` with one (random
    and reported missing if the checkpoint lacks it), and `pipeline("image-feature-extraction",
    pool=True)` returns `pooler_output`. Here the pooler's dense layer is the identity and its
    activation `linear` (`config.pooler_act`), so `pooler_output == last_hidden_state[:, 0]`: the
    `[CLS]` token after the final layer norm, bit for bit.

    When `image_size` differs from the trained `config.image_size`, the position embeddings are
    resampled from the trained grid by the model's own `interpolate_pos_encoding` (bicubic), so
    that at `image_size` the copy computes what the original computes with
    `interpolate_pos_encoding=True`.
    """
    config = copy.deepcopy(backbone.config)
    config.pooler_act = "linear"
    config.pooler_output_size = config.hidden_size
    config.image_size = image_size
    model = ViTModel(config, add_pooling_layer=True)
    state = {key: value for key, value in backbone.state_dict().items() if not key.startswith("pooler.")}
    if image_size != backbone.config.image_size:
        num_patches = (image_size // config.patch_size) ** 2
        with torch.no_grad():
            placeholder = torch.empty(1, 1 + num_patches, config.hidden_size)  # only its shape is read
            state["embeddings.position_embeddings"] = backbone.embeddings.interpolate_pos_encoding(
                placeholder, image_size, image_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(key.startswith("pooler.") for key in missing), (missing, unexpected)
    with torch.no_grad():
        model.pooler.dense.weight.copy_(torch.eye(config.hidden_size))
        model.pooler.dense.bias.zero_()
    return model.to(next(backbone.parameters()).dtype)


def save_teacher_backbone(teacher: DinoModel, directory: str | Path, recipe: DinoRecipe, results: dict) -> Path:
    """Write the teacher's backbone as a plain transformers model folder (see `save_backbone_folder`)."""
    return save_backbone_folder(teacher.backbone, directory, recipe, results)


def save_backbone_folder(backbone, directory: str | Path, recipe: DinoRecipe, results: dict) -> Path:
    """Write a backbone as a plain transformers model folder: config.json, model.safetensors,
    preprocessor_config.json and README.md (the model card)."""
    directory = Path(directory)
    if isinstance(backbone, ViTModel):
        backbone = exportable_vit(backbone, recipe.evaluation_image_size)
    elif getattr(backbone.config, "image_size", recipe.evaluation_image_size) != recipe.evaluation_image_size:
        # the CIFAR-stem ResNet records the size evaluations use
        backbone = copy.deepcopy(backbone)
        backbone.config.image_size = recipe.evaluation_image_size
    backbone.save_pretrained(directory)
    build_image_processor(recipe).save_pretrained(directory)
    card = render_model_card(recipe, results, type(backbone).__name__)
    card.save(directory / "README.md")
    return directory


class HubPusher:
    """Uploads folders to one Hub model repo through huggingface_hub, one after another on a
    background thread, so that training never waits for the network.

    Each pushed folder is first copied to a private staging directory (a checkpoint may be
    rotated away while its upload runs). Failures (network, auth, quota) are logged and counted,
    never raised.
    """

    def __init__(self, repo_id: str, private: bool = False, api=None):
        from huggingface_hub import HfApi

        self.repo_id, self.private = repo_id, private
        self.api = api or HfApi()
        self.succeeded, self.failed = 0, 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_dino_push")
        self._futures: list[Future] = []
        self._repo_created = False

    def push(self, folder: str | Path, commit_message: str) -> Future:
        """Stage `folder` and queue its upload; returns the upload's Future (result: bool)."""
        staging = Path(tempfile.mkdtemp(prefix="hf_dino_push_"))
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        future = self._executor.submit(self._upload, staging, commit_message)
        self._futures.append(future)
        return future

    def _upload(self, staging: Path, commit_message: str) -> bool:
        try:
            if not self._repo_created:
                self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
                self._repo_created = True
            self.api.upload_folder(folder_path=str(staging), repo_id=self.repo_id, commit_message=commit_message)
            self.succeeded += 1
            logger.info("Pushed %r to %s", commit_message, self.repo_id)
            return True
        except Exception as error:  # network, auth, quota: report and carry on
            self.failed += 1
            logger.warning("Push %r to %s failed: %s", commit_message, self.repo_id, error)
            return False
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def wait(self) -> dict:
        """Block until every queued upload has finished; {"succeeded", "failed"} counts."""
        for future in self._futures:
            future.result()
        self._executor.shutdown(wait=True)
        return {"repo_id": self.repo_id, "succeeded": self.succeeded, "failed": self.failed}


def push_folder(folder: str | Path, repo_id: str, private: bool = False, commit_message: str = "Upload") -> bool:
    """Upload one folder and wait for it; errors are logged, never raised. Returns success."""
    pusher = HubPusher(repo_id, private)
    pusher.push(folder, commit_message)
    return pusher.wait()["succeeded"] == 1


def push_run(output_dir: str | Path, repo_id: str, private: bool = False, extra_results: dict | None = None,
             include_dino: bool = False, space_id: str | None = None) -> bool:
    """Push a finished run's `teacher_backbone/` (card re-rendered from `recipe.json`, `results.json`
    and `extra_results`, e.g. {"linear": eval_linear output}, with a link to the Hub Space `space_id`
    if given) to `repo_id`; with `include_dino`, also its `dino/` folder under `dino/` in the same
    repo. Returns success."""
    output_dir = Path(output_dir)
    backbone_dir = output_dir / "teacher_backbone"
    for required in (backbone_dir / "config.json", output_dir / "recipe.json"):
        if not required.exists():
            raise FileNotFoundError(f"{required} is missing: {output_dir} is not a finished hf_dino run")
    recipe = DinoRecipe.from_dict(json.loads((output_dir / "recipe.json").read_text()), source="recipe.json")
    results_path = output_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update(extra_results or {})
    with tempfile.TemporaryDirectory(prefix="hf_dino_card_") as staging:
        staging = Path(staging)
        shutil.copytree(backbone_dir, staging, dirs_exist_ok=True)
        card = render_model_card(recipe, results, _backbone_class(backbone_dir), repo_id, space_id=space_id)
        card.save(staging / "README.md")
        if include_dino and (output_dir / "dino").exists():
            shutil.copytree(output_dir / "dino", staging / "dino")
        return push_folder(staging, repo_id, private, commit_message=f"hf_dino run {output_dir.name}")


def _backbone_class(directory: Path) -> str:
    architectures = json.loads((directory / "config.json").read_text()).get("architectures") or ["ViTModel"]
    return architectures[0]
