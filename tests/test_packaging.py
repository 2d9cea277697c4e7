"""The wheel is self-sufficient: built from this checkout and installed into a fresh virtual
environment (which reuses this environment's packages, not the checkout), its console scripts
run from another directory with the packaged recipes and demo data; DAVIS data never ships."""

import os
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (path,) = out.glob("hf_dino-*.whl")
    return path


def test_wheel_carries_recipes_demo_data_and_card_but_no_davis(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("hf_dino/configs/demo_cifar10_cpu.yaml", "hf_dino/configs/vit_small_16.yaml",
                     "hf_dino/demo_data/cifar10/train.parquet", "hf_dino/demo_data/cifar10/test.parquet",
                     "hf_dino/model_cards/teacher_backbone.md", "hf_dino/commands/pretrain.py",
                     "hf_dino/metrics/accuracy/accuracy.py"):
        assert required in names, required
    davis = ("JPEGImages/", "Annotations/", "ImageSets/", "blackswan", "car-shadow")  # CC BY-NC: never shipped
    assert not [name for name in names if any(part in name for part in davis)]
    assert not any(name.startswith(("benchmarks/", "tests/")) for name in names)


def test_every_console_script_names_a_command_with_main():
    import importlib

    for name, target in PYPROJECT["project"]["scripts"].items():
        module, function = target.split(":")
        assert name == "hf-dino-" + module.rsplit(".", 1)[1].replace("_", "-")
        assert callable(getattr(importlib.import_module(module), function)), target
        assert (REPO / "scripts" / f"{module.rsplit('.', 1)[1]}.py").exists(), f"scripts/ mirror of {name}"


@pytest.mark.slow
def test_installed_wheel_runs_from_another_directory(wheel, tmp_path):
    environment = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(environment)
    python = environment / "bin" / "python"
    # --no-deps: the dependencies come from this environment (system site packages); the editable
    # checkout is hidden below by running from tmp_path with the wheel's copy first on sys.path
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                    "--target", str(tmp_path / "site"), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([str(python), "-c", "import hf_dino, sys; print(hf_dino.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert where.startswith(str(tmp_path / "site")), where
    help_text = subprocess.run([str(tmp_path / "site" / "bin" / "hf-dino-pretrain"), "--help"], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=300)
    assert help_text.returncode == 0, help_text.stderr[-2000:]
    assert "(default: vit_tiny)" in " ".join(help_text.stdout.split())  # the packaged demo recipe is in force
    run = subprocess.run([str(tmp_path / "site" / "bin" / "hf-dino-pretrain"), "--max_steps", "2", "--num_workers",
                          "0", "--knn_max_train_samples", "64", "--logging_steps", "1", "--output_dir",
                          str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "teacher_backbone" / "model.safetensors").exists()
    assert (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("old, new", [("attention", "visualization.attention"),
                                      ("attention_video", "visualization.attention_video"),
                                      ("plotting", "visualization.plotting"), ("app", "demo.app"),
                                      ("space", "demo.space")])
def test_moved_modules_still_import_from_their_old_path_with_a_warning(old, new):
    """`hf_dino.attention` etc. moved under `visualization/` and `demo/`; for one release the old path
    gives the new module (the same object: patches and isinstance checks see one module) and a
    FutureWarning naming the new path. Run in a fresh interpreter, where neither is imported yet."""
    code = (f"import warnings, importlib\n"
            f"with warnings.catch_warnings(record=True) as caught:\n"
            f"    warnings.simplefilter('always')\n"
            f"    old = importlib.import_module('hf_dino.{old}')\n"
            f"assert old is importlib.import_module('hf_dino.{new}'), old\n"
            f"assert [str(w.message) for w in caught if w.category is FutureWarning] == "
            f"['hf_dino.{old} moved to hf_dino.{new}; import it from there (the old path goes in the next release)']\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
