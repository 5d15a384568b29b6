"""The demo's Image to image and Outpaint tabs (issue 18, item 2): their actions against the pipeline's
img2img and outpaint, and the tabs driven in headless Chromium (Debian's `chromium`; skipped where it is
absent), with the fixtures and helpers of tests/test_demo.py."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

from sundae.apps import demo  # noqa: E402
from sundae.images import image_to_tensor, tensor_to_image  # noqa: E402
from sundae.pipeline import SundaePipeline  # noqa: E402
from sundae.sundae import SamplerConfig  # noqa: E402
from test_demo import GRID, _fetch, _opened, _set, browser, nets  # noqa: E402,F401  (fixtures used by name)

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = SamplerConfig(steps=6, min_steps=2)


def _picture(path, height=32, width=32, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_img2img_and_outpaint_actions_give_the_pipelines_images(nets, tmp_path):
    pipe = SundaePipeline(*nets, GRID)
    actions = demo.Actions(pipe, max_pixels=64 * 64, max_samples=8)
    _picture(tmp_path / "in.png")
    image = image_to_tensor(Image.open(tmp_path / "in.png"))
    sampler = demo.sampler_values(FAST)
    # class 3, guidance 1, 2 images, strength 0.5, seed 4
    images, status = actions.img2img(str(tmp_path / "in.png"), 3, 1.0, 2, 0.5, 4, *sampler)
    expected = pipe.img2img(image, 0.5, 2, 3, sampler=FAST, seed=4)
    assert [np.asarray(x).tolist() for x in images] == [np.asarray(x).tolist() for x in expected.images]
    assert status.split(" in ")[0] == "2 images" and "32 of 64 tokens replaced" in status
    assert "the last 3 of 6 sampler steps" in status
    # class 1, guidance 1, 1 image, left 3, top 0, right 5, bottom 2, seed 0
    images, status = actions.outpaint(str(tmp_path / "in.png"), 1, 1.0, 1, 3, 0, 5, 2, 0, *sampler)
    expected = pipe.outpaint(image, (3, 0, 5, 2), 1, 1, sampler=FAST, seed=0)
    assert np.array_equal(np.asarray(images[0]), np.asarray(expected.images[0])) and images[0].size == (40, 34)
    assert "1 images of 40x34 pixels" in status
    for call, message in ((lambda: actions.img2img(None, 0, 1.0, 1, 0.5, 0, *sampler), "Upload an image first"),
                          (lambda: actions.img2img(str(tmp_path / "in.png"), 0, 1.0, 1, None, 0, *sampler),
                           "Strength is empty"),
                          (lambda: actions.outpaint(str(tmp_path / "in.png"), 0, 1.0, 1, 0, None, 0, 0, 0, *sampler),
                           "An extent is empty"),
                          (lambda: actions.outpaint(str(tmp_path / "in.png"), 0, 1.0, 1, -4, 0, 0, 0, 0, *sampler),
                           "extend must be four integers >= 0"),
                          (lambda: actions.outpaint(str(tmp_path / "in.png"), 0, 1.0, 1, 0, 0, 200, 0, 0, *sampler),
                           "would be 232x32 = 7424 pixels; the limit is 4096 pixels")):
        with pytest.raises(gr.Error, match=message):
            call()


@pytest.fixture(scope="module")
def page(browser, nets):  # noqa: F811
    """The class-conditional app (64x64-pixel limit), open in headless Chromium."""
    app = demo.build_app(SundaePipeline(*nets, GRID), max_pixels=64 * 64, max_samples=16)
    with _opened(browser, app, 64 * 64) as page:
        yield page


def _run_tab(page, tab: str, prefix: str, path, **numbers) -> str:
    """Open `tab`, upload `path`, set the number boxes `prefix-NAME` and run; returns the status text."""
    page.reload()
    page.wait_for_selector("#gen-run")
    page.get_by_role("tab", name=tab).click()
    if path is not None:
        page.locator(f"#{prefix}-upload input[type=file]").set_input_files(path)
        page.wait_for_selector(f"#{prefix}-upload img", timeout=10_000)
        time.sleep(0.5)
    for name, value in numbers.items():
        _set(page, f"{prefix}-{name}", value)
    page.click(f"#{prefix}-run")
    page.wait_for_function(f"document.querySelector('#{prefix}-status').innerText.includes(' in ')",
                           timeout=30_000)
    return page.locator(f"#{prefix}-status").inner_text()


def test_image_to_image_tab_at_strength_0_shows_the_reconstruction(page, nets, tmp_path):
    _picture(tmp_path / "in.png", seed=1)
    status = _run_tab(page, "Image to image", "i2i", tmp_path / "in.png", num=2, strength=0, steps=6)
    images = _fetch(page, "#i2i-images img")
    pipe = SundaePipeline(*nets, GRID)
    expected = np.asarray(tensor_to_image(pipe.reconstruct(image_to_tensor(Image.open(tmp_path / "in.png"))[None])[0]))
    assert len(images) == 2 and all(np.array_equal(x, expected) for x in images), status
    assert "0 of 64 tokens replaced" in status


def test_image_to_image_tab_gives_the_pipelines_variations(page, nets, tmp_path):
    _picture(tmp_path / "in.png", seed=2)
    _run_tab(page, "Image to image", "i2i", tmp_path / "in.png", num=2, strength=0.5, steps=6, seed=3)
    images = _fetch(page, "#i2i-images img")
    pipe = SundaePipeline(*nets, GRID)
    sampler = SamplerConfig(**{**pipe.sampler.__dict__, "steps": 6})
    expected = pipe.img2img(Image.open(tmp_path / "in.png"), 0.5, 2, 0, sampler=sampler, seed=3)  # class 0: default
    assert [x.tolist() for x in images] == [np.asarray(x).tolist() for x in expected.images]


def test_outpaint_tab_keeps_the_upload_and_grows_the_canvas(page, tmp_path):
    pixels = _picture(tmp_path / "in.png", seed=3)
    status = _run_tab(page, "Outpaint", "out", tmp_path / "in.png", num=2, left=3, top=0, right=5, bottom=2,
                      steps=6)
    images = _fetch(page, "#out-images img")
    assert len(images) == 2 and "of 40x34 pixels" in status
    for out in images:
        assert out.shape == (34, 40, 3) and np.array_equal(out[0:32, 3:35], pixels)
    assert (images[0][32:] != images[1][32:]).any()  # two seeds, two borders


def test_edit_tabs_say_what_is_wrong_in_the_page(page, tmp_path):
    page.reload()
    page.wait_for_selector("#gen-run")
    page.get_by_role("tab", name="Image to image").click()
    page.click("#i2i-run")
    page.get_by_text("Upload an image first").wait_for(timeout=10_000)
    _picture(tmp_path / "in.png")
    page.reload()
    page.wait_for_selector("#gen-run")
    page.get_by_role("tab", name="Outpaint").click()
    page.locator("#out-upload input[type=file]").set_input_files(tmp_path / "in.png")
    page.wait_for_selector("#out-upload img", timeout=10_000)
    _set(page, "out-right", 200)
    page.click("#out-run")
    page.get_by_text("would be 232x32 = 7424 pixels; the limit is 4096 pixels").wait_for(timeout=10_000)
    assert "Traceback" not in page.content()
