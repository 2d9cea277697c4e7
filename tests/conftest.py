import os
import signal
import subprocess
from pathlib import Path

import pytest

# The DAVIS-2016 sample beside the checkout (CC BY-NC: read by tests, never packaged).
DAVIS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "davis"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_vit(seed: int = 0, *, hidden_size: int = 32, num_hidden_layers: int = 1, num_attention_heads: int = 2,
             intermediate_size: int | None = None, image_size: int = 16, patch_size: int = 4,
             layer_norm_eps: float | None = None, save_to=None):
    """A small transformers `ViTModel` (no pooler) drawn from `seed`, in eval mode; written to the folder
    `save_to` with `save_pretrained` when given. `intermediate_size` defaults to 2 x the width and
    `layer_norm_eps` to transformers' default (the reference's is 1e-6)."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                       num_attention_heads=num_attention_heads, intermediate_size=intermediate_size or 2 * hidden_size,
                       image_size=image_size, patch_size=patch_size,
                       **({} if layer_norm_eps is None else {"layer_norm_eps": layer_norm_eps}))
    model = ViTModel(config, add_pooling_layer=False).eval()
    if save_to is not None:
        model.save_pretrained(save_to)
    return model


def run_with_timeout(command: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `command` in its own process group; on timeout kill the whole group (launcher and
    workers) and fail: a hang must not outlive the test."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   **(env or {})}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:6])}... still running after {timeout} s (a hang):\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture
def decoded(monkeypatch) -> list[int]:
    """The images `hf_dino.data` decodes during the test in this process (not in DataLoader worker
    processes), in order, each as the grey level of its first pixel."""
    import hf_dino.data as data_module

    levels: list[int] = []
    read_image = data_module.read_image

    def recording_read_image(value, max_pixels=data_module.DEFAULT_MAX_IMAGE_PIXELS):
        image, reason = read_image(value, max_pixels)
        if image is not None:
            levels.append(int(image[0, 0, 0]))
        return image, reason

    monkeypatch.setattr(data_module, "read_image", recording_read_image)
    return levels


@pytest.fixture(scope="module")
def saved_tiny_vit(tmp_path_factory):
    """A folder holding a tiny ViT (width 48, 2 blocks, 3 heads, 32 px images, patch 8): the model of
    the image-search tests (retrieval, copy detection)."""
    folder = tmp_path_factory.mktemp("vit")
    tiny_vit(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=8, save_to=folder)
    return folder
