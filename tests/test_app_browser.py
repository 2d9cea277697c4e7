"""The demo app in a real browser: headless Debian Chromium driven by Playwright uploads an image
and reads the page (attention image, per-head maps, neighbour gallery, bad-input message, the
Jaccard given a ground-truth mask).

Chromium is Debian's `chromium` package at /usr/bin/chromium (Playwright cannot download its
own browsers here; `.ci/run` installs the package). Without it the test is skipped locally and
fails in CI (CI=true).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

import conftest  # noqa: E402
from hf_dino.demo.app import DinoDemo, build_app, load_gallery  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000


def chromium_or_skip() -> str:
    if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    message = f"{CHROMIUM} not found: install Debian's chromium package (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def image_stats(page, selector: str) -> dict:
    """Natural size of a rendered <img> and the spread of its pixel values (drawn on a canvas)."""
    return page.eval_on_selector(selector, """img => {
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const context = canvas.getContext('2d');
        context.drawImage(img, 0, 0);
        const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
        let min = 255, max = 0;
        for (let i = 0; i < data.length; i += 4) { min = Math.min(min, data[i]); max = Math.max(max, data[i]); }
        return {width: img.naturalWidth, height: img.naturalHeight, min: min, max: max};
    }""")


@pytest.mark.timeout(240)
def test_upload_shows_attention_and_neighbours_in_chromium(tmp_path):
    executable = chromium_or_skip()
    model_dir = tmp_path / "tiny_vit"
    conftest.tiny_vit(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=8,
                      save_to=model_dir)
    gallery = load_gallery(None, max_images=32)
    photo = tmp_path / "photo.png"  # a real photograph: gallery image 3, enlarged
    Image.fromarray(gallery.image(3)).resize((96, 96), Image.BICUBIC).save(photo)
    truth = tmp_path / "truth.png"
    Image.new("L", (96, 96), 255).save(truth)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels")

    page_app = build_app(demo=DinoDemo(model=str(model_dir), max_gallery_images=32, cache_dir=tmp_path / "cache"),
                         top_k=6)
    port = free_port()
    page_app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1100})
            try:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#status >> text=ready")

                # a non-image file: a message in the page
                page.set_input_files("#input-image input[type=file]", str(not_an_image))
                page.wait_for_selector("#status >> text=not an image file")

                # the server still answers: a real image, uploaded, then analysed on upload
                page.set_input_files("#input-image input[type=file]", str(photo))
                page.wait_for_selector("#status >> text=4x4 patches")
                page.wait_for_selector("#mean-attention img")
                page.wait_for_function("document.querySelectorAll('#neighbours img').length >= 6")
                page.wait_for_function("document.querySelectorAll('#heads img').length >= 3")

                mean = image_stats(page, "#mean-attention img")
                assert (mean["width"], mean["height"]) == (224, 224)
                assert mean["max"] - mean["min"] > 50  # an overlay on a photo, not a blank image
                mask = image_stats(page, "#mask img")
                assert (mask["width"], mask["height"]) == (224, 224)
                captions = page.locator("#neighbours").inner_text()
                assert len(re.findall(r"· [01]\.\d{3}", captions)) >= 6  # "label · similarity" captions
                assert "head 2" in page.locator("#heads").inner_text()
                neighbour = image_stats(page, "#neighbours img")
                assert neighbour["width"] >= 32 and neighbour["max"] > neighbour["min"]

                # the optional ground truth (the whole image is the object): the masks are scored
                page.get_by_text("Ground-truth mask (optional)").click()
                page.set_input_files("#ground-truth input[type=file]", str(truth))
                page.wait_for_selector("#ground-truth img")
                page.click("#analyze")
                page.wait_for_selector("#status >> text=Jaccard with the ground truth")
                assert len(re.findall(r"J \d+\.\d%", page.locator("#heads").inner_text())) == 3

                screenshot = tmp_path / "app_screenshot.png"
                page.screenshot(path=str(screenshot), full_page=True)
                assert np.asarray(Image.open(screenshot)).std() > 10
            finally:
                browser.close()
    finally:
        page_app.close()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
