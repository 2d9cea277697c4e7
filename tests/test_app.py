"""The demo app (hf_dino.demo.app) through its Gradio API, its bad-input messages, the gallery cache,
the command line, and the Space folder (hf_dino.demo.space) run as the Hub would run it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import conftest  # noqa: E402
from hf_dino.demo import app as app_module  # noqa: E402
from hf_dino.demo.app import DinoDemo, build_app, example_images, load_gallery  # noqa: E402
from hf_dino.demo.space import write_space  # noqa: E402
from hf_dino.visualization.attention import attention_mass_masks  # noqa: E402

GALLERY_SIZE = 48
QUERY_ROW = 5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_tiny_vit(folder: Path, seed: int = 0) -> Path:
    """A random ViT: 32 px images, 8 px patches (4x4 grid), 3 heads."""
    conftest.tiny_vit(seed, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=8,
                      save_to=folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


@pytest.fixture(scope="module")
def query_image(tmp_path_factory) -> Path:
    """Gallery image QUERY_ROW of the embedded demo test split, as a lossless PNG file."""
    gallery = load_gallery(None, max_images=GALLERY_SIZE)
    assert gallery.dataset.split == "test"
    path = tmp_path_factory.mktemp("query") / "gallery_row.png"
    Image.fromarray(gallery.image(QUERY_ROW)).save(path)
    return path


@pytest.fixture(scope="module")
def demo(tiny_model, tmp_path_factory) -> DinoDemo:
    return DinoDemo(model=str(tiny_model), max_gallery_images=GALLERY_SIZE,
                    cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def served(demo):
    """The app on a free local port (stopped at the end of the module)."""
    page = build_app(demo=demo)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


def predict(client, image, model="", threshold=0.6, image_size=0, top_k=5, *ground_truth):
    """The /analyze endpoint; `ground_truth` (a mask file) is optional, as for an older client."""
    files = [gradio_client.handle_file(str(path)) if path is not None else None for path in (image, *ground_truth)]
    return client.predict(files[0], model, threshold, image_size, top_k, *files[1:], api_name="/analyze")


@pytest.mark.timeout(180)
def test_api_answers_attention_maps_and_neighbours(served, tiny_model, query_image):
    client = gradio_client.Client(served, verbose=False)
    message, mean_image, heads, mask_image, neighbours, scores, jaccard = predict(client, query_image,
                                                                                  str(tiny_model), top_k=5)
    assert jaccard is None  # no ground truth given
    assert "⚠️" not in message and "4x4 patches" in message
    assert Image.open(mean_image).size == (224, 224) and Image.open(mask_image).size == (224, 224)
    assert len(heads) == 3 and [h["caption"].split(":")[0] for h in heads] == ["head 0", "head 1", "head 2"]
    assert len(neighbours) == 5 and len(scores) == 5
    # the query is gallery row QUERY_ROW itself: its own feature is the nearest, cosine 1
    assert scores[0]["row"] == QUERY_ROW and scores[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    similarities = [entry["similarity"] for entry in scores]
    assert similarities == sorted(similarities, reverse=True) and all(-1 <= s <= 1 + 1e-4 for s in similarities)
    assert scores[0]["label"] == load_gallery(None, max_images=GALLERY_SIZE).label(QUERY_ROW)
    assert neighbours[0]["caption"] == f"{scores[0]['label']} · {scores[0]['similarity']:.3f}"


@pytest.mark.timeout(180)
def test_api_reports_bad_input_and_keeps_serving(served, tiny_model, query_image, tmp_path):
    client = gradio_client.Client(served, verbose=False)
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    message, mean_image, heads, *_ = predict(client, text_file, str(tiny_model))
    assert "is not an image file" in message and mean_image is None and heads == []
    message, mean_image, *_ = predict(client, query_image, str(tmp_path / "no_such_model"))
    assert "no such folder" in message and mean_image is None
    message, mean_image, *_ = predict(client, None, str(tiny_model))
    assert "Upload an image" in message
    message, mean_image, *_ = predict(client, query_image, str(tiny_model))  # still serving
    assert "⚠️" not in message and mean_image is not None


def test_mask_keeps_the_fewest_patches_holding_the_threshold_mass(demo, query_image):
    for threshold in (0.3, 0.6, 0.9):
        result = demo.analyze(str(query_image), threshold=threshold, top_k=3)
        mean = result.attention.mean(0)
        share = mean / mean.sum()
        kept = share[result.mask]
        assert result.attention.shape == (3, 4, 4) and result.mask.shape == (4, 4)
        assert kept.sum() >= threshold - 1e-6  # the mask holds the threshold's share
        assert kept.sum() - kept.min() < threshold  # and no kept patch could be dropped
        dropped = share[~result.mask]
        assert dropped.numel() == 0 or kept.min() >= dropped.max()  # the most attended ones
        # each head's CLS-to-patch attention: softmax weights without the CLS itself
        sums = result.attention.flatten(1).sum(1)
        assert torch.all(sums > 0) and torch.all(sums <= 1 + 1e-5)


def test_grayscale_rgba_and_larger_attention_input(demo, query_image, tmp_path):
    pixels = np.asarray(Image.open(query_image))
    opaque = tmp_path / "opaque.png"
    Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)]), "RGBA").save(opaque)
    for image_size in (0, 64):  # native size: one forward pass for both; 64 px: a second pass at 32 px
        result = demo.analyze(str(opaque), top_k=1, image_size=image_size)
        assert "converted from RGBA" in result.message
        # a fully opaque alpha channel changes nothing: the image is still its own neighbour
        assert result.neighbour_table[0]["row"] == QUERY_ROW
        assert result.neighbour_table[0]["similarity"] == pytest.approx(1.0, abs=1e-4)

    gray = tmp_path / "gray.jpg"
    Image.fromarray(pixels).convert("L").save(gray)
    result = demo.analyze(str(gray), image_size=64)
    assert "converted from L" in result.message and result.attention.shape == (3, 8, 8)
    assert result.mean_overlay.shape == (224, 224, 3) and len(result.head_overlays) == 3


def test_attention_input_is_capped_by_token_count(demo, query_image):
    """At most MAX_ATTENTION_TOKENS patches whatever the patch size: 64 x 64 patches, 512 px at
    patch 8 (the tiny model's), 1,024 px at patch 16. A larger request is answered at the cap and
    says so; the page's slider stops there; Gradio's file cache is cleaned on a schedule."""
    assert app_module.MAX_ATTENTION_TOKENS == 4096
    assert app_module.max_attention_size(8) == 512 and app_module.max_attention_size(16) == 1024
    result = demo.analyze(str(query_image), image_size=2000, top_k=1)
    assert result.attention.shape == (3, 64, 64) and "capped at 512 px" in result.message
    assert "capped" not in demo.analyze(str(query_image), image_size=512, top_k=1).message
    page = build_app(demo=demo)
    sliders = [block for block in page.blocks.values() if getattr(block, "elem_id", None) == "image-size"]
    assert [slider.maximum for slider in sliders] == [512]
    assert page.delete_cache == app_module.DELETE_CACHE and page.delete_cache[1] <= 24 * 3600


def pixel_jaccard(mask: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> float:
    """Jaccard in percent over the valid pixels, written out for the tests."""
    both = np.logical_and(mask, truth)[valid].sum()
    either = np.logical_or(mask, truth)[valid].sum()
    return 100.0 if either == 0 else 100.0 * both / either


def test_ground_truth_mask_is_scored_by_jaccard_over_pixels(demo, query_image, tmp_path):
    """A 32 x 48 image (the query padded by 8 px each side) and its mask: the model sees the centre
    32 x 32 square, and the mask is cropped with it. Expected scores: the patch masks the page
    shows, blown up to pixels by hand, against the hand-drawn truth."""
    pixels = np.asarray(Image.open(query_image))
    wide = tmp_path / "wide.png"
    Image.fromarray(np.pad(pixels, ((0, 0), (8, 8), (0, 0)), mode="edge")).save(wide)
    truth = np.zeros((32, 48), np.uint8)
    truth[4:20, 14:34] = 255  # not patch-aligned: in the square, rows 4..19, columns 6..25
    truth_file = tmp_path / "truth.png"
    Image.fromarray(truth).save(truth_file)  # an "L" 0/255 mask, as DAVIS-2016's

    result = demo.analyze(str(wide), top_k=1, ground_truth=str(truth_file))
    seen = np.zeros((32, 32), bool)
    seen[4:20, 6:26] = True
    valid = np.ones((32, 32), bool)
    blow_up = lambda mask: np.kron(np.asarray(mask, dtype=np.uint8), np.ones((8, 8), np.uint8)).astype(bool)  # noqa: E731
    heads = [pixel_jaccard(blow_up(mask), seen, valid) for mask in attention_mass_masks(result.attention, 0.6)]
    assert result.jaccard["per_head"] == pytest.approx(heads, abs=0.01)
    assert result.jaccard["averaged_attention"] == pytest.approx(pixel_jaccard(blow_up(result.mask), seen, valid),
                                                                 abs=0.01)
    assert result.jaccard["best_head"] == {"index": int(np.argmax(heads)),
                                           "jaccard": pytest.approx(max(heads), abs=0.01)}
    assert "Jaccard with the ground truth" in result.message
    assert all(caption.endswith(f"J {score:.1f}%") for (_, caption), score in zip(result.head_overlays, heads))
    # the truth's outline is drawn in yellow on the mask picture, and only there
    yellow = np.all(result.mask_image == app_module.TRUTH_COLOUR, axis=-1)
    assert yellow.any() and not np.all(demo.analyze(str(wide), top_k=1).mask_image == result.mask_image)


def test_palette_ground_truth_ignores_the_voc_border(demo, query_image, tmp_path):
    """A VOC-style palette PNG: index 0 background, 255 ignored, other indices foreground. Ignored
    pixels count neither in the intersection nor in the union."""
    truth = np.zeros((32, 32), np.uint8)
    truth[0:16, 0:16] = 3  # an object id
    truth[16:24, :] = 255  # a wide "border" band, ignored
    truth_file = tmp_path / "voc.png"
    palette_image = Image.fromarray(truth, mode="P")
    palette_image.putpalette([value for index in range(256) for value in (index, 255 - index, index // 2)])
    palette_image.save(truth_file)
    assert Image.open(truth_file).mode == "P"

    result = demo.analyze(str(query_image), top_k=1, ground_truth=str(truth_file))
    mask = np.kron(result.mask.numpy().astype(np.uint8), np.ones((8, 8), np.uint8)).astype(bool)
    valid = np.ones((32, 32), bool)
    valid[16:24, :] = False
    expected = pixel_jaccard(mask, truth == 3, valid)
    assert result.jaccard["averaged_attention"] == pytest.approx(expected, abs=0.01)
    # the same mask read as a plain image would count the band as foreground: a different score
    assert expected != pytest.approx(pixel_jaccard(mask, truth > 0, np.ones((32, 32), bool)), abs=0.01)


def test_ground_truth_of_another_size_is_refused_with_a_message(demo, query_image, tmp_path):
    other = tmp_path / "other.png"
    Image.new("L", (40, 30)).save(other)
    message, *_, jaccard = demo.answer(str(query_image), "", 0.6, 0, 5, str(other))
    assert "is 40x30 px but the image is 32x32" in message and jaccard is None
    not_an_image = tmp_path / "mask.png"
    not_an_image.write_text("no")
    assert "is not an image file" in demo.answer(str(query_image), "", 0.6, 0, 5, str(not_an_image))[0]


@pytest.mark.timeout(180)
def test_api_takes_an_optional_ground_truth(served, tiny_model, query_image, tmp_path):
    truth = tmp_path / "everything.png"
    Image.new("L", (32, 32), 255).save(truth)  # the whole image is the object
    client = gradio_client.Client(served, verbose=False)
    message, *_, jaccard = predict(client, query_image, str(tiny_model), 0.6, 0, 3, truth)
    assert "⚠️" not in message and len(jaccard["per_head"]) == 3
    # every mask is inside the truth: Jaccard = the mask's share of the 16 patches
    mask_share = float(message.split("the mask keeps ")[1].split(" patches")[0].split("/")[0]) / 16
    assert jaccard["averaged_attention"] == pytest.approx(100 * mask_share, abs=0.01)


def test_huge_and_corrupt_images_are_refused_with_a_message(demo, query_image, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(huge)  # 48 MP, a few kB on disk
    message = demo.answer(str(huge), "", 0.6, 0, 5)[0]
    assert "8000x6000" in message and "48 MP" in message and "Downscale" in message
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(query_image.read_bytes()[:200])
    assert "could not be decoded" in demo.answer(str(truncated), "", 0.6, 0, 5)[0]
    assert "(0, 1]" in demo.answer(str(query_image), "", 1.5, 0, 5)[0]


def test_no_model_page_says_how_to_get_one(tmp_path, monkeypatch, query_image):
    monkeypatch.chdir(tmp_path)  # no outputs/demo_cifar10_cpu/teacher_backbone here
    page = build_app(cache_dir=None)
    assert page.dino_demo.model is None
    status = next(block for block in page.blocks.values() if getattr(block, "elem_id", None) == "status")
    assert "accelerate launch scripts/pretrain.py" in status.value
    message = page.dino_demo.answer(str(query_image), "", 0.6, 0, 5)[0]
    assert "No model loaded" in message and "outputs/demo_cifar10_cpu/teacher_backbone" in message
    assert not Path(app_module.__file__).with_suffix(".pyi").exists()  # no Gradio stub written into the package


def test_default_model_is_the_demo_runs_teacher(tmp_path, monkeypatch, tiny_model):
    monkeypatch.chdir(tmp_path)
    assert app_module.default_model() is None
    target = tmp_path / "outputs" / "demo_cifar10_cpu" / "teacher_backbone"
    target.parent.mkdir(parents=True)
    target.symlink_to(tiny_model, target_is_directory=True)
    assert app_module.default_model() == str(Path("outputs/demo_cifar10_cpu/teacher_backbone"))


def test_gallery_features_are_cached_per_model(demo, tiny_model, tmp_path, monkeypatch):
    features, rows = demo.gallery_features(demo.load(str(tiny_model)))
    assert features.shape == (GALLERY_SIZE, 24) and rows.tolist() == list(range(GALLERY_SIZE))
    assert torch.allclose(features.norm(dim=1), torch.ones(GALLERY_SIZE), atol=1e-5)
    assert len(list(Path(demo.cache_dir).glob("*.safetensors"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cached features should have been read")

    monkeypatch.setattr(app_module, "compute_gallery_features", fail)
    again = DinoDemo(model=str(tiny_model), max_gallery_images=GALLERY_SIZE, cache_dir=demo.cache_dir)
    cached, cached_rows = again.gallery_features(again.load(str(tiny_model)))
    assert torch.equal(cached, features) and torch.equal(cached_rows, rows)
    monkeypatch.undo()

    other = save_tiny_vit(tmp_path / "other", seed=1)  # other weights: another cache entry
    third = DinoDemo(model=str(other), max_gallery_images=GALLERY_SIZE, cache_dir=demo.cache_dir)
    assert not torch.allclose(third.gallery_features(third.load(str(other)))[0], features)
    assert len(list(Path(demo.cache_dir).glob("*.safetensors"))) == 2


def test_bundled_examples_are_small_images():
    examples = example_images()
    assert len(examples) >= 3
    for path in examples:
        with Image.open(path) as image:
            assert image.mode == "RGB" and max(image.size) <= 256 and Path(path).stat().st_size < 64_000


def test_command_line_rejects_bad_values_before_serving(tmp_path, capsys):
    from hf_dino.commands.app import main

    for argv, expected in ((["--model", str(tmp_path / "missing")], "--model"),
                           (["--threshold", "0"], "--threshold 0.0"),
                           (["--gallery", str(tmp_path / "missing")], "--gallery")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith(f"error: {expected}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SystemExit):
            main(["--port", str(busy.getsockname()[1])])
    assert "already in use" in capsys.readouterr().err


def test_command_line_defaults_bind_localhost_without_share():
    from hf_dino.cli import parse_args
    from hf_dino.commands.app import Arguments

    (args,) = parse_args(Arguments, argv=[])
    assert args.host == "127.0.0.1" and args.share is False and args.port == 7860


def test_space_folder_metadata(tmp_path):
    import gradio

    folder = write_space(tmp_path / "space", "me/dino-demo", vendor_package=False)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    readme = (folder / "README.md").read_text()
    assert readme.startswith("---\n")
    metadata = yaml.safe_load(readme.split("---\n")[1])
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py"
    assert metadata["sdk_version"] == gradio.__version__ and metadata["models"] == ["me/dino-demo"]
    assert len(metadata["short_description"]) <= 60
    requirements = (folder / "requirements.txt").read_text().split()
    names = {line.split("<")[0].split(">")[0].split("=")[0] for line in requirements}
    assert {"torch", "transformers", "albumentations", "datasets"} <= names and "gradio" not in names
    assert "'me/dino-demo'" in (folder / "app.py").read_text()
    compile((folder / "app.py").read_text(), "app.py", "exec")


def wait_for_http(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_space_folder_app_runs_locally(tmp_path, tiny_model, query_image):
    """The generated folder's own app.py, with its vendored hf_dino, served and queried."""
    folder = write_space(tmp_path / "space", str(tiny_model))
    assert (folder / "hf_dino" / "demo" / "app.py").read_text() == Path(app_module.__file__).read_text()
    assert (folder / "hf_dino" / "demo_data" / "cifar10" / "test.parquet").is_file()
    assert not (folder / "hf_dino" / "demo_data" / "cifar10" / "train.parquet").exists()
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    log = open(tmp_path / "space.log", "wb")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", process, timeout=240)
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        message, mean_image, heads, _, neighbours, scores, _ = predict(client, query_image, top_k=3)
        assert str(tiny_model) in message and len(heads) == 3 and len(neighbours) == 3
        assert scores[0]["similarity"] == pytest.approx(1.0, abs=1e-4)  # row 5 is in the Space's gallery too
        assert list((folder / "gallery_cache").glob("*.safetensors"))  # the folder's app wrote its cache
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
        log.close()


@pytest.mark.timeout(120)
def test_push_to_hub_space_writes_the_folder_and_reports_a_failed_upload(tmp_path, tiny_model, capsys, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1, the test suite's setting) both uploads fail: reported, exit code 1,
    the Space folder written for the pushed model id."""
    import json
    import shutil

    from hf_dino import DinoRecipe
    from hf_dino.commands.push_to_hub import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    shutil.copytree(tiny_model, run / "teacher_backbone")
    (run / "recipe.json").write_text(json.dumps(DinoRecipe().to_dict()))
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--hub_model_id", "me/dino-demo", "--space", "me/dino-demo-app"])
    assert exit_info.value.code == 1
    output = capsys.readouterr().out
    assert "Space" in output and "me/dino-demo-app: FAILED" in output
    readme = (run / "space" / "README.md").read_text()
    assert yaml.safe_load(readme.split("---\n")[1])["models"] == ["me/dino-demo"]
    assert "'me/dino-demo'" in (run / "space" / "app.py").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--hub_model_id", "me/dino-demo", "--space", "no-org"])
    assert exit_info.value.code == 2


@pytest.mark.skipif(not (conftest.DAVIS / "JPEGImages").is_dir(), reason="no DAVIS sample in ../shared/data/davis")
def test_app_jaccard_equals_the_evaluation_on_a_square_davis_frame(tmp_path):
    """A 480 x 480 crop of a real DAVIS frame and its mask, at 480 px: the app's centre square and
    the evaluation's square resize both leave the pixels as they are, so the app's Jaccard must be
    the evaluation command's for that one image (hf_dino.evaluation.attention_segmentation, itself
    checked against the reference's code)."""
    from hf_dino.evaluation.attention_segmentation import davis_samples, evaluate_attention_segmentation

    frame = np.asarray(Image.open(conftest.DAVIS / "JPEGImages" / "480p" / "blackswan" / "00000.jpg"))[:, 187:667]
    mask = np.asarray(Image.open(conftest.DAVIS / "Annotations" / "480p" / "blackswan" / "00000.png"))[:, 187:667]
    root = tmp_path / "davis"
    (root / "JPEGImages" / "480p" / "swan").mkdir(parents=True)
    (root / "Annotations" / "480p" / "swan").mkdir(parents=True)
    Image.fromarray(frame).save(root / "JPEGImages" / "480p" / "swan" / "00000.jpg", quality=95)
    Image.fromarray(mask).save(root / "Annotations" / "480p" / "swan" / "00000.png")
    model_dir = tmp_path / "vit"
    conftest.tiny_vit(1, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=16,
                      save_to=model_dir)

    demo = DinoDemo(model=str(model_dir), max_gallery_images=4, cache_dir=None)
    app_scores = demo.analyze(str(root / "JPEGImages" / "480p" / "swan" / "00000.jpg"), image_size=480, top_k=1,
                              ground_truth=str(root / "Annotations" / "480p" / "swan" / "00000.png")).jaccard
    model = demo.load(str(model_dir)).model
    evaluation = evaluate_attention_segmentation(model, davis_samples(root), "davis", image_size=480, progress=False)
    assert evaluation["images"] == 1 and 5 < evaluation["averaged_attention"] < 95  # a non-trivial mask
    assert app_scores["per_head"] == pytest.approx(evaluation["per_head"], abs=0.01)
    assert app_scores["averaged_attention"] == pytest.approx(evaluation["averaged_attention"], abs=0.01)
    assert app_scores["best_head"]["index"] == evaluation["best_head_index"]
