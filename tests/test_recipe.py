from pathlib import Path

import pytest

from hf_dino.recipe import DinoRecipe, parse_recipe

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_the_papers():
    recipe = DinoRecipe()
    assert (recipe.out_dim, recipe.student_temp, recipe.center_momentum) == (65536, 0.1, 0.9)
    assert (recipe.warmup_teacher_temp, recipe.teacher_temp, recipe.momentum_teacher) == (0.04, 0.07, 0.996)
    assert (recipe.weight_decay, recipe.weight_decay_end, recipe.clip_grad, recipe.lr) == (0.04, 0.4, 3.0, 0.0005)
    assert (recipe.global_crops_scale, recipe.local_crops_scale) == ((0.4, 1.0), (0.05, 0.4))
    assert (recipe.global_crop_size, recipe.local_crop_size, recipe.freeze_last_layer) == (224, 96, 1)


def test_yaml_then_command_line_precedence(tmp_path):
    config = tmp_path / "r.yaml"
    config.write_text("arch: vit_tiny\nlr: 0.001\nlocal_crops_scale: [0.1, 0.3]\n")
    recipe = parse_recipe(["--config", str(config), "--lr", "0.002", "--norm_last_layer", "false"])
    assert recipe.arch == "vit_tiny" and recipe.lr == 0.002 and recipe.local_crops_scale == (0.1, 0.3)
    assert recipe.norm_last_layer is False


def usage_error_of(argv, capsys, default_config=None) -> str:
    """The one-line message of a command line that must fail with exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse_recipe(argv, default_config=default_config)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1, message
    return message


def test_unknown_yaml_field_is_named(tmp_path, capsys):
    config = tmp_path / "r.yaml"
    config.write_text("teacher_tmp: 0.04\n")
    assert "teacher_tmp" in usage_error_of(["--config", str(config)], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "vit_huge"], "--arch: invalid choice: 'vit_huge' (choose from 'vit_tiny', 'vit_small', 'vit_base', 'resnet18', 'resnet34', 'resnet50')"),
    (["--global_crop_size", "100"], "global_crop_size=100 is not a multiple of patch_size=16"),
    (["--lr", "-0.1"], "lr=-0.1 is negative"),
    (["--optimizer", "lars"], "--optimizer: invalid choice: 'lars' (choose from 'adamw', 'sgd')"),
    (["--dataset_name", "/no/such/dir"], "does not exist"),
    (["--local_crops_scale", "0.5", "0.1"], "local_crops_scale"),
    (["--push_to_hub", "true"], "hub_model_id"),
    (["--attn_implementation", "flash"], "invalid choice: 'flash' (choose from 'auto', 'sdpa', 'eager')"),
    (["--resnet_stem", "cifar"], "resnet_stem='cifar' applies to ResNets only"),
    (["--arch", "resnet18", "--num_hidden_layers", "3"], "num_hidden_layers / num_attention_heads are ViT settings"),
    (["--arch", "resnet18", "--resnet_stem", "small"], "--resnet_stem: invalid choice: 'small' (choose from 'imagenet', 'cifar')"),
])
def test_bad_configuration_fails_with_a_message(argv, message, capsys):
    assert message in usage_error_of(argv, capsys)


def test_bad_yaml_values_are_validated_too():
    with pytest.raises(ValueError, match="arch 'vit_huge' is unknown"):
        DinoRecipe(arch="vit_huge").validate()


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "ten"], "--epochs/--num_train_epochs: invalid int value: 'ten' (expected an integer)"),
    (["--push_to_hub", "maybe"], "--push_to_hub"),
    (["--mixed_precision", "fp8"], "invalid choice: 'fp8' (choose from 'no', 'bf16', 'fp16')"),
    (["--report_to", "tensorbord"], "unknown tracker(s) tensorbord"),
    (["--config", "no_such_recipe"], "no packaged recipe of that name"),
    (["--lr"], "expected one argument"),
])
def test_bad_flag_values_are_one_line_naming_flag_and_allowed_values(argv, message, capsys):
    assert message in usage_error_of(argv, capsys, default_config="demo_cifar10_cpu")


def test_hugging_face_spellings_and_bare_booleans():
    recipe = parse_recipe(["--learning_rate", "0.01", "--per_device_train_batch_size", "8", "--num_train_epochs", "2",
                           "--push_to_hub", "--hub_model_id", "me/dino", "--no_norm_last_layer",
                           "--report_to", "tensorboard,wandb"])
    assert (recipe.lr, recipe.batch_size_per_device, recipe.epochs) == (0.01, 8, 2)
    assert recipe.push_to_hub is True and recipe.norm_last_layer is False
    assert recipe.report_to_list() == ["tensorboard", "wandb"]
    assert DinoRecipe(report_to="none").report_to_list() == [] and DinoRecipe().report_to_list() == []


def test_default_config_is_in_force_and_shown_by_help(capsys):
    recipe = parse_recipe([], default_config="demo_cifar10_cpu")
    assert (recipe.arch, recipe.output_dir) == ("vit_tiny", "outputs/demo_cifar10_cpu")
    assert recipe.mixed_precision is None  # unset: the launcher's precision
    with pytest.raises(SystemExit):
        parse_recipe(["--help"], default_config="demo_cifar10_cpu")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--arch {vit_tiny,vit_small,vit_base,resnet18,resnet34,resnet50}" in help_text
    assert "backbone architecture (default: vit_tiny)" in help_text  # the demo's, not the paper's vit_small


def test_packaged_recipes_resolve_by_name_or_old_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert parse_recipe(["--config", "vit_small_16"]).arch == "vit_small"
    assert parse_recipe(["--config", "configs/vit_base_16.yaml"]).arch == "vit_base"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    DinoRecipe.from_yaml(path).validate()


def test_augmentation_strengths_reach_the_pipelines():
    from hf_dino.transforms import MultiCropAugmentation

    recipe = parse_recipe(["--blur_probs", "0", "0.3", "0", "--solarize_prob", "0.5", "--blur_sigma", "0.1", "0.5"])
    augmentation = MultiCropAugmentation(32, 16, local_crops_number=1, params=recipe.augmentation_params())
    names = [type(t).__name__ for t in augmentation.global_1.transforms]
    assert "GaussianBlur" not in names  # probability 0: not in the pipeline at all
    blur = next(t for t in augmentation.global_2.transforms if type(t).__name__ == "GaussianBlur")
    solarize = next(t for t in augmentation.global_2.transforms if type(t).__name__ == "Solarize")
    assert blur.p == 0.3 and blur.sigma_limit == (0.1, 0.5) and solarize.p == 0.5


def test_hub_dataset_ids_pass_validation():
    assert parse_recipe(["--dataset_name", "ILSVRC/imagenet-1k"]).dataset_name == "ILSVRC/imagenet-1k"


def test_colour_augmentation_fields_reach_the_pipeline_and_are_validated():
    params = DinoRecipe(color_jitter=(0.1, 0.2, 0.3, 0.05), color_jitter_prob=0.4, grayscale_prob=0.0).augmentation_params()
    assert (params.brightness, params.contrast, params.saturation, params.hue) == (0.1, 0.2, 0.3, 0.05)
    assert (params.color_jitter_prob, params.grayscale_prob) == (0.4, 0.0)
    with pytest.raises(ValueError, match="color_jitter_prob"):
        DinoRecipe(color_jitter_prob=1.5).validate()
    with pytest.raises(ValueError, match="hue <= 0.5"):
        DinoRecipe(color_jitter=(0.4, 0.4, 0.2, 0.7)).validate()


def test_koleo_and_sinkhorn_fields_are_validated():
    recipe = parse_recipe(["--koleo_loss_weight", "0.1", "--teacher_centering", "sinkhorn_knopp"])
    assert (recipe.koleo_loss_weight, recipe.teacher_centering) == (0.1, "sinkhorn_knopp")
    assert (DinoRecipe().koleo_loss_weight, DinoRecipe().teacher_centering) == (0.0, "center")  # the paper's
    with pytest.raises(ValueError, match="koleo_loss_weight=-0.1 is negative"):
        DinoRecipe(koleo_loss_weight=-0.1).validate()
    DinoRecipe(koleo_loss_weight=0.1, batch_size_per_device=1).validate()  # the global batch may hold several
    with pytest.raises(ValueError, match="teacher_centering 'mean' is unknown"):
        DinoRecipe(teacher_centering="mean").validate()


def test_eval_image_size_defaults_to_the_global_crops_and_must_fit_the_patches():
    assert DinoRecipe(global_crop_size=32, local_crop_size=16, patch_size=8).evaluation_image_size == 32
    assert DinoRecipe(global_crop_size=32, local_crop_size=16, patch_size=8, eval_image_size=64).evaluation_image_size == 64
    with pytest.raises(ValueError, match="eval_image_size=60 is not a multiple of patch_size=8"):
        DinoRecipe(arch="vit_tiny", global_crop_size=32, local_crop_size=16, patch_size=8, eval_image_size=60).validate()
    with pytest.raises(ValueError, match="eval_image_size=0 must be >= 1"):
        DinoRecipe(arch="vit_tiny", global_crop_size=32, local_crop_size=16, patch_size=8, eval_image_size=0).validate()


@pytest.mark.parametrize("name, value, overwritten", [("position_embedding_init", "sincos", "position embeddings"),
                                                      ("attention_init", "mimetic", "attention weights")])
def test_the_vit_initialisations_are_validated(name, value, overwritten):
    assert getattr(DinoRecipe(), name) == "random"  # the reference's
    assert getattr(parse_recipe([f"--{name}", value]), name) == value
    with pytest.raises(ValueError, match=f"{name} 'bogus' is unknown"):
        DinoRecipe(**{name: "bogus"}).validate()
    with pytest.raises(ValueError, match=f"{name}={value} applies to ViTs only"):
        DinoRecipe(arch="resnet18", **{name: value}).validate()
    with pytest.raises(ValueError, match=f"would overwrite init_backbone's {overwritten}"):
        DinoRecipe(init_backbone="facebook/dino-vits16", **{name: value}).validate()


def test_sincos_position_embeddings_need_a_width_divisible_by_4():
    with pytest.raises(ValueError, match="width divisible by 4, got 190"):
        DinoRecipe(position_embedding_init="sincos", hidden_size=190, num_attention_heads=2).validate()



@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_no_shipped_recipe_pins_a_precision(config):
    """The launcher (`accelerate launch --mixed_precision`, or the accelerate config file) decides the
    precision of every shipped recipe: a recipe value would override it."""
    import yaml

    assert "mixed_precision" not in (yaml.safe_load(config.read_text()) or {})
    assert parse_recipe(["--config", str(config)]).mixed_precision is None


def test_the_default_recipe_follows_the_data():
    """No --config and no --dataset_name: the embedded demo; a --dataset_name without --config: the
    paper's ViT-S/16 (DinoRecipe's defaults); --config: that file."""
    from hf_dino.recipe import DEFAULT_CONFIG, default_recipe_file

    assert default_recipe_file([]) == default_recipe_file(["--max_steps", "5"]) == DEFAULT_CONFIG
    for argv in (["--dataset_name", "imagenet-1k"], ["--dataset_name=imagenet-1k"], ["--config", "vit_base_8"],
                 ["--config", "demo_cifar10_cpu", "--dataset_name", "x"]):
        assert default_recipe_file(argv) is None, argv
    demo = parse_recipe([], default_config=default_recipe_file([]))
    paper = parse_recipe(["--dataset_name", "imagenet-1k"], default_config=default_recipe_file(["--dataset_name", "x"]))
    assert (demo.arch, demo.global_crop_size, demo.use_bn_in_head, demo.koleo_loss_weight) == ("vit_tiny", 32, True, 0.1)
    assert paper == DinoRecipe(dataset_name="imagenet-1k")


def test_a_run_with_a_dataset_and_no_config_trains_and_names_the_papers_recipe(tmp_path, caplog):
    """`pretrain.py --dataset_name DIR` (a few size flags to make it quick): ViT-S/16 at 224 px, K = 65,536,
    no batch norm, no KoLeo; the first log line says so and names the flags."""
    import json
    import logging

    import numpy as np
    from PIL import Image

    from hf_dino.commands import pretrain

    (tmp_path / "images").mkdir()
    for index in range(4):
        Image.fromarray(np.full((40, 40, 3), 50 * index, np.uint8)).save(tmp_path / "images" / f"{index}.png")
    argv = ["--dataset_name", str(tmp_path / "images"), "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
            "--batch_size_per_device", "2", "--local_crops_number", "1", "--num_workers", "0"]
    with caplog.at_level(logging.INFO, logger="hf_dino"):
        pretrain.main(argv)
    first = next(record.getMessage() for record in caplog.records if record.name.startswith("hf_dino"))
    assert first == ("Recipe: DinoRecipe's defaults, the paper's ViT-S/16 (--dataset_name without --config); from "
                     "flags: dataset_name, output_dir, max_steps, batch_size_per_device, local_crops_number, "
                     "num_workers; every other value: DinoRecipe's default (the paper's)")
    trained = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert (trained["arch"], trained["patch_size"], trained["global_crop_size"], trained["out_dim"]) == (
        "vit_small", 16, 224, 65536)
    assert (trained["use_bn_in_head"], trained["koleo_loss_weight"], trained["mixed_precision"]) == (False, 0.0, None)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["global_step"] == 1


def test_the_first_log_line_names_the_file_and_the_flags_of_each_value():
    from hf_dino.recipe import recipe_sources

    line = recipe_sources(["--config", "vit_small_16", "--learning_rate", "0.001", "--no_norm_last_layer"])
    assert line.startswith("Recipe: vit_small_16 (--config); from ") and "vit_small_16.yaml: arch, patch_size" in line
    assert line.endswith("; from flags: lr, norm_last_layer; every other value: DinoRecipe's default (the paper's)")
    assert ", norm_last_layer," not in line.split("; from flags")[0]  # a flag wins over the file
    demo = recipe_sources(["--max_steps", "3"], "demo_cifar10_cpu.yaml")
    assert demo.startswith("Recipe: demo_cifar10_cpu (the packaged default: no --config and no --dataset_name)")
