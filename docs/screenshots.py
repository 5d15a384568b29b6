"""Take the README's screenshots of `sundae demo`: one per tab, in headless Chromium (Debian's `chromium`).

    python docs/screenshots.py --run quickstart        # a `sundae quickstart` output folder
    python docs/screenshots.py --run quickstart --text-run emoji   # + `sundae quickstart --dataset emoji`

Writes docs/demo_generate.png and docs/demo_inpaint.png. The Generate tab samples with guidance scale 2;
the Inpaint tab gets the first Fashion-MNIST test image (an ankle boot) with a stroke painted across its
top. With `--text-run`, also docs/demo_text.png: the Generate tab of the text-to-image emoji model with
four prompts (one per line, cycled over the samples) at guidance scale 3, the quickstart's.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from sundae.apps.demo import build_app, serve
from sundae.data import FASHION_MNIST_DIR, open_images
from sundae.images import save_image
from sundae.pipeline import SundaePipeline

DOCS = Path(__file__).resolve().parent


def _set(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _save(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as img:  # a 64-colour palette keeps the PNG small
        img.convert("RGB").quantize(64).save(path, optimize=True)


def _serve(run: Path):
    """Serve the demo of the quickstart folder `run` on a free local port: (app, url)."""
    app = build_app(SundaePipeline.from_pretrained(run, "cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return app, serve(app, "127.0.0.1", port, block=False)


def _generate(page, url: str, steps: int, guidance: float, path: Path, prompts: str | None = None) -> None:
    page.goto(url)
    page.wait_for_selector("#gen-run")
    _set(page, "gen-steps", steps)
    _set(page, "gen-guidance", guidance)
    if prompts is not None:
        page.locator("#gen-prompt textarea").fill(prompts)
    page.click("#gen-run")
    page.wait_for_function("document.querySelector('#gen-status').innerText.startsWith('Done')")
    time.sleep(0.5)
    _save(page, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="quickstart output folder")
    parser.add_argument("--text-run", help="an emoji quickstart output folder (`--dataset emoji`): also "
                        "docs/demo_text.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    app, url = _serve(Path(args.run))
    boot = Path(tempfile.mkdtemp()) / "boot.png"
    save_image(open_images(FASHION_MNIST_DIR, 32, 1, "test")[0][0], boot)
    written = [DOCS / "demo_generate.png", DOCS / "demo_inpaint.png"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True)
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        _generate(page, url, 40, 2, written[0])

        page.get_by_role("tab", name="Inpaint").click()
        page.wait_for_selector("#editor canvas")
        page.locator("#upload input[type=file]").set_input_files(boot)
        page.locator("#editor").get_by_text("select the draw tool").wait_for(state="hidden")
        time.sleep(1.0)
        page.locator("#inp-class input").click()
        page.get_by_role("option", name="9: Ankle boot").click()
        box = page.locator("#editor canvas").first.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 30, cy - 60)
        page.mouse.down()
        page.mouse.move(cx + 50, cy - 60, steps=10)
        page.mouse.move(cx + 50, cy - 20, steps=10)
        page.mouse.up()
        page.click("#inp-run")
        page.wait_for_function("document.querySelector('#inp-status').innerText.includes('completions in')")
        time.sleep(0.5)
        _save(page, written[1])
        app.close()
        if args.text_run:
            app, url = _serve(Path(args.text_run))
            written.append(DOCS / "demo_text.png")
            _generate(page, url, 32, 3, written[2], "red apple\nrocket\nsnowman\nchristmas tree")
            app.close()
        browser.close()
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
