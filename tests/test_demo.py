"""`sundae demo`: the live sampler iterator, the page's input checks, and the app itself driven in headless
Chromium (Debian's `chromium`; skipped where it is absent) on random-weight tiny networks: class-conditional,
unconditional, and text-conditional with the real default text encoder (all-MiniLM-L6-v2, loaded offline)."""

import contextlib
import dataclasses
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

from sundae.apps import demo  # noqa: E402  (after the skip: gradio is the optional `demo` extra)
from sundae.checkpoint import save_checkpoint  # noqa: E402
from sundae.cli import main  # noqa: E402
from sundae.hourglass import Hourglass  # noqa: E402
from sundae.hourglass import PRESETS as HOURGLASS_PRESETS  # noqa: E402
from sundae.images import make_grid, tensor_to_image  # noqa: E402
from sundae.pipeline import SundaePipeline, class_logits_fn, inpaint_images  # noqa: E402
from sundae.sundae import SamplerConfig, sample  # noqa: E402
from sundae.text import DEFAULT as MINILM  # noqa: E402
from sundae.text import load_text_encoder  # noqa: E402
from sundae.vqgan import PRESETS as VQGAN_PRESETS  # noqa: E402
from sundae.vqgan import VQGAN  # noqa: E402
from test_images import count_decodes, png_declaring  # noqa: E402  (tests/ is on the path, as for cli_helpers)

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module
V = 64  # the tiny presets' codebook
GRID = {"grid": [8, 8]}
TEXT_META = {"grid": [8, 8], "text_encoder": MINILM}


@pytest.fixture(scope="module")
def nets():
    """Random-weight tiny generator (10 classes, 64 codes) and tokenizer (RGB, f=4): 8x8 tokens, 32x32 px."""
    torch.manual_seed(0)
    return Hourglass(HOURGLASS_PRESETS["tiny"]).eval(), VQGAN(VQGAN_PRESETS["tiny"]).eval()


@pytest.fixture(scope="module")
def text_net():
    """Random-weight tiny text-conditional generator (no classes) for all-MiniLM-L6-v2's 384-wide features,
    its text projections drawn large so that the prompt visibly steers the samples."""
    torch.manual_seed(1)
    net = Hourglass(dataclasses.replace(HOURGLASS_PRESETS["tiny"], num_classes=0, text_dim=384)).eval()
    with torch.no_grad():
        for p in net.text_embedding.parameters():
            p.normal_(0, 1.0)
    return net


@pytest.fixture(scope="module")
def text_pipe(nets, text_net):
    return SundaePipeline(text_net, nets[1], TEXT_META)


def _inputs(**sampler) -> list:
    """The page's sampler inputs for `SamplerConfig(**sampler)`."""
    return demo.sampler_values(SamplerConfig(**sampler))


def _seeded(seed: int, num: int) -> list[torch.Generator]:
    """Sample i's generator, seeded seed + i (the pipeline's and the CLI's rule)."""
    return [torch.Generator().manual_seed(seed + i) for i in range(num)]


def _decoded_grid(tokenizer, z):
    """Tokens `b h w` -> the grid the demo shows: decoded one at a time, ceil(sqrt(b)) per row."""
    with torch.inference_mode():
        images = torch.cat([tokenizer.decode(z[i:i + 1]) for i in range(len(z))])
    return np.asarray(tensor_to_image(make_grid(images, nrow=int(np.ceil(np.sqrt(len(z)))))))


# ---- the live sampler --------------------------------------------------------------------------------

def test_sample_live_previews_every_n_steps_and_ends_with_the_samplers_result(nets):
    net = nets[0]
    logits_fn = lambda z, rows, step: net(z)  # noqa: E731
    sampler = SamplerConfig(steps=10, min_steps=10, temperature=(1.0, 0.7), update_proportion=0.5)
    seen = list(demo.sample_live(logits_fn, (3, 8, 8), V, 4, sampler, generator=_seeded(7, 3)))
    # Calls 0..9 see the tokens after 0..9 steps; previews at 0, 4, 8, then the result after all 10.
    assert [(step, taken is None) for step, _, _, taken in seen] == [(0, True), (4, True), (8, True), (10, False)]
    start = torch.cat([torch.randint(0, V, (1, 8, 8), generator=g) for g in _seeded(7, 3)])  # the uniform start
    assert torch.equal(seen[0][2], start)
    z, steps = sample(logits_fn, (3, 8, 8), V, sampler, generator=_seeded(7, 3))
    assert torch.equal(seen[-1][2], z) and seen[-1][3].tolist() == [10, 10, 10]  # min_steps=steps: no stop
    assert not torch.equal(seen[1][2], seen[2][2])  # the grid moves between previews
    # The same iterator runs again from scratch: nothing in it counts calls across runs.
    again = list(demo.sample_live(logits_fn, (3, 8, 8), V, 4, sampler, generator=_seeded(7, 3)))
    assert [s for s, *_ in again] == [0, 4, 8, 10] and torch.equal(again[-1][2], z)


def test_sample_live_shows_finished_samples_after_they_leave_the_batch():
    def towards_five(z, rows, step):  # every position overwhelmingly prefers code 5
        logits = torch.zeros(*z.shape, V)
        logits[..., 5] = 100.0
        return logits
    seen = list(demo.sample_live(towards_five, (2, 4, 4), V, 1, SamplerConfig(steps=30, min_steps=2,
                                                                              update_proportion=1.0),
                                 generator=torch.Generator().manual_seed(0)))
    # Step 1 sets every token to 5; step 2 changes nothing, so both stop after 2 steps and leave the batch at
    # the compaction after step 10; the sampler then ends: calls 0..9, a preview at each, then the result.
    assert [s for s, *_ in seen] == list(range(10)) + [10]
    assert all(bool((tokens == 5).all()) for _, _, tokens, _ in seen[1:])
    assert seen[-1][3].tolist() == [2, 2]


def test_closing_sample_live_stops_the_sampler():
    calls = []

    def slow(z, rows, step):
        calls.append(1)
        return torch.zeros(*z.shape, V)
    live = demo.sample_live(slow, (1, 4, 4), V, 1, SamplerConfig(steps=10_000, min_steps=10_000))
    next(live)
    live.close()  # joins the sampler's thread
    stopped_at = len(calls)
    time.sleep(0.2)
    assert len(calls) == stopped_at < 10  # the queue holds two previews: at most a few more calls ran


def test_sample_live_raises_the_samplers_errors():
    with pytest.raises(ValueError, match="temperature"):
        list(demo.sample_live(lambda z, rows, step: torch.zeros(*z.shape, V), (1, 4, 4), V, 1, temperature=(0.0, 1.0)))


# ---- input checks: messages for the page -------------------------------------------------------------

def test_sampler_inputs_are_sampler_config_fields_and_its_errors_page_messages():
    """The page's sampler inputs are SamplerConfig's fields in order (a schedule's start and end apart); the
    values are checked by building a SamplerConfig, whose ValueError becomes the page's message."""
    assert [label for _, label in demo.SAMPLER_INPUTS] == [
        "steps", "temperature start", "temperature end", "update proportion start", "update proportion end",
        "min steps", "early stop", "update positions"]
    cfg = SamplerConfig(steps=20, temperature=(1.0, 0.5), update_proportion=(0.8, 0.2), min_steps=5, early_stop=False,
                        update_positions="informed")
    assert demo.sampler_values(cfg) == [20, 1.0, 0.5, 0.8, 0.2, 5, False, "informed"]
    assert demo._sampler([20, 1.0, 0.5, 0.8, 0.2, 5, False, "informed"]) == cfg
    for values, message in (([20, 1.0, None, 0.5, 0.5, 5, True, "random"], "Temperature end is empty: enter a number"),
                            ([20, 0.0, 1.0, 0.5, 0.5, 5, True, "random"], r"Temperature must be .*> 0"),
                            ([0, 1.0, 1.0, 0.5, 0.5, 5, True, "random"], "Steps must be >= 1, got 0"),
                            ([2.5, 1.0, 1.0, 0.5, 0.5, 5, True, "random"], "Steps must be an integer, got 2.5"),
                            ([20, 1.0, 1.0, 0.5, 1.5, 5, True, "random"], r"Update proportion must lie in \(0, 1\]"),
                            ([20, 1.0, 1.0, 0.5, 0.5, -1, True, "random"], "Min steps must be >= 0, got -1"),
                            ([20, 1.0, 1.0, 0.5, 0.5, 5, True, "lowest"], "Update positions must be one of")):
        with pytest.raises(gr.Error, match=message):
            demo._sampler(values)


def test_editor_value_to_image_and_mask():
    background = Image.new("RGBA", (12, 8), (10, 20, 30, 255))
    background.putpixel((0, 0), (10, 20, 30, 0))  # a transparent pixel: laid onto white
    layer = Image.new("RGBA", (12, 8), (0, 0, 0, 0))
    layer.putpixel((5, 3), (255, 0, 255, 150))
    layer.putpixel((11, 7), (255, 0, 255, 1))
    image, mask = demo._editor_image_and_mask({"background": background, "layers": [layer]}, 3, 96)
    assert image.shape == (3, 8, 12) and mask.shape == (1, 8, 12)
    assert image[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert image[:, 1, 1].tolist() == pytest.approx([10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1])
    assert mask.nonzero().tolist() == [[0, 3, 5], [0, 7, 11]]
    gray, _ = demo._editor_image_and_mask({"background": background, "layers": [layer]}, 1, 96)
    assert gray.shape == (1, 8, 12)
    with pytest.raises(gr.Error, match="Upload an image first"):
        demo._editor_image_and_mask({"background": None, "layers": []}, 3, 96)
    with pytest.raises(gr.Error, match="12x8 = 96 pixels; this demo takes at most 95"):
        demo._editor_image_and_mask({"background": background, "layers": [layer]}, 3, 95)
    with pytest.raises(gr.Error, match="Paint the region"):
        demo._editor_image_and_mask({"background": background, "layers": [Image.new("RGBA", (12, 8))]}, 3, 96)


# ---- the buttons' actions, in process ---------------------------------------------------------------

def _recorded(monkeypatch, target, name: str) -> list:
    """Every value `target.name` returns or yields from now on (the test's spy; the call itself is unchanged)."""
    seen, original = [], getattr(target, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        if not hasattr(out, "__next__"):
            seen.append(out)
            return out
        return (seen.append(item) or item for item in out)
    monkeypatch.setattr(target, name, spy)
    return seen


def test_generate_tab_gives_the_pipelines_samples(nets, monkeypatch):
    """With seed s the Generate tab's final tokens, steps and grid are those of `pipe(num, class_labels,
    seed=s, sampler=...)`, and sample i is drawn from seed s + i: watching the sampler changes nothing."""
    net, tokenizer = nets
    pipe = SundaePipeline(net, tokenizer, GRID)
    actions = demo.Actions(pipe, max_samples=8)
    live = _recorded(monkeypatch, demo, "sample_live")
    sampler = SamplerConfig(steps=12, min_steps=10)
    # class "all", guidance 1 (none), 5 samples, redraw every 4 steps, seed 3
    seen = list(actions.generate(demo.ALL_CLASSES, 1, 5, 4, 3, *demo.sampler_values(sampler)))
    assert [text.split(":")[0] for _, text in seen] == ["Step 0 of 12", "Step 4 of 12", "Step 8 of 12", "Done"]
    out = pipe(5, None, seed=3, sampler=sampler, output_type="pt", progress=False)
    *_, (_, _, tokens, taken) = live
    assert torch.equal(tokens.cpu(), out.tokens) and torch.equal(taken.cpu(), out.steps)
    grid, text = seen[-1]
    expected = tensor_to_image(make_grid(out.images, nrow=3))
    assert grid.size == (2 + 3 * 34, 2 + 2 * 34) and np.array_equal(np.asarray(grid), np.asarray(expected))
    assert text.endswith(": " + ", ".join(str(t) for t in out.steps.tolist()))
    labels = torch.arange(5)  # "all" cycles through the classes
    z, _ = sample(lambda z, rows, step: net(z, labels[rows]), (5, 8, 8), V, sampler, generator=_seeded(3, 5))
    assert torch.equal(z, out.tokens)  # independently: the network, the sampler, generators seeded 3 + i
    for values, message in (((12, 1, 5, 4, 3), "outside the trained classes 0..9"),
                            ((0, 1, 9, 4, 3), "Number of samples must be 1..8"),
                            ((0, 1, 2, 4, -1), r"Seed must lie in 0\.\.")):
        with pytest.raises(gr.Error, match=message):
            list(actions.generate(*values, *demo.sampler_values(sampler)))


def _elem_ids(app: gr.Blocks) -> set[str]:
    return {block.elem_id for block in app.blocks.values() if block.elem_id}


def test_each_generator_gets_its_own_conditioning_inputs(nets, text_pipe):
    """Classes: a class box and a guidance scale; text: a prompt box and a guidance scale; unconditional:
    neither (there is no condition to guide by), in both tabs."""
    unconditional = Hourglass(dataclasses.replace(HOURGLASS_PRESETS["tiny"], num_classes=0)).eval()
    cases = ((SundaePipeline(nets[0], nets[1], GRID), {"class", "guidance"}),
             (text_pipe, {"prompt", "guidance"}),
             (SundaePipeline(unconditional, nets[1], GRID), set()))
    for pipe, inputs in cases:
        ids = _elem_ids(demo.build_app(pipe))
        assert {"gen-run", "inp-run"} <= ids
        for tab in ("gen", "inp"):
            assert {name for name in ("class", "prompt", "guidance") if f"{tab}-{name}" in ids} == inputs, (tab, ids)


def test_sampler_widgets_show_the_pipelines_sampler(nets):
    """One widget per SamplerConfig input in each tab, holding the pipeline's sampler (a bundle's own)."""
    sampler = SamplerConfig(steps=40, temperature=(1.0, 0.7), update_proportion=0.6, min_steps=3, early_stop=False,
                            update_positions="informed")
    app = demo.build_app(SundaePipeline(*nets, GRID, sampler=sampler))
    values = {block.elem_id: block.value for block in app.blocks.values() if block.elem_id}
    for tab in ("gen", "inp"):
        shown = [values[f"{tab}-{label.replace(' ', '-')}"] for _, label in demo.SAMPLER_INPUTS]
        assert shown == [40, 1.0, 0.7, 0.6, 0.6, 3, False, "informed"]


def test_unconditional_generator_needs_no_class(nets):
    net = Hourglass(dataclasses.replace(HOURGLASS_PRESETS["tiny"], num_classes=0)).eval()
    pipe = SundaePipeline(net, nets[1])  # no meta: the tokenizer's 32x32 training size, 8x8 tokens
    assert isinstance(demo.build_app(pipe), gr.Blocks)
    # no class value: 3 samples, redraw every 5 steps, seed 0, T = 4, min steps 2
    *_, (grid, text) = demo.Actions(pipe).generate(3, 5, 0, *_inputs(steps=4, min_steps=2))
    assert grid.size == (2 + 2 * 34, 2 + 2 * 34) and text.startswith("Done: 3 samples of 32x32 pixels")


def test_load_action_reads_uploads_by_the_library_policy(nets, tmp_path):
    actions = demo.Actions(SundaePipeline(*nets, GRID), max_pixels=40 * 30)
    rgba = Image.new("RGBA", (40, 30), (10, 20, 30, 255))
    rgba.putpixel((3, 2), (10, 20, 30, 0))  # transparent: onto white, as `sundae inpaint` reads it
    rgba.save(tmp_path / "a.png")
    value = actions.load(str(tmp_path / "a.png"))
    background = np.asarray(value["background"])
    assert background.shape == (30, 40, 4) and value["layers"] == []
    assert background[2, 3].tolist() == [255, 255, 255, 255] and background[0, 0].tolist() == [10, 20, 30, 255]
    assert actions.load(None) is None
    Image.new("RGB", (41, 30)).save(tmp_path / "b.png")
    with pytest.raises(gr.Error, match="Image b.png declares 41x30 = 1230 pixels; the limit is 1200 pixels"):
        actions.load(str(tmp_path / "b.png"))
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(gr.Error, match="Cannot read image c.png") as err:
        actions.load(str(tmp_path / "c.png"))
    assert str(tmp_path) not in str(err.value)


def test_bad_uploads_are_one_line_messages_and_huge_canvases_are_never_decoded(nets, tmp_path, monkeypatch):
    """The upload event hands `Actions.upload` Gradio's file data undecoded; every file that cannot be used is
    one line for the page, naming the upload but no server folder, and an image declaring more than
    `max_pixels` is refused from its header, its pixels never decoded."""
    actions = demo.Actions(SundaePipeline(*nets, GRID), max_pixels=64 * 64)
    decodes = count_decodes(monkeypatch)
    (tmp_path / "notes.png").write_text("hello, not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:1500])
    png_declaring(tmp_path / "bomb.png", 9000, 9000, 9000)  # about 10 kB of file, 243 MB of RGB pixels
    png_declaring(tmp_path / "huge.png", 40000, 40000, 1)  # over twice Pillow's decompression-bomb limit
    for name, message in (
            ("notes.png", "Cannot read image notes.png: not an image Pillow can read, or its header is damaged (it "
                          "starts with b'hello, not an im')"),
            ("empty.png", "Cannot read image empty.png: empty file"),
            ("cut.png", "Cannot read image cut.png: image file is truncated"),
            ("bomb.png", "Image bomb.png declares 9000x9000 = 81000000 pixels; the limit is 4096 pixels"),
            ("huge.png", "Image huge.png refused as a possible decompression bomb (Pillow's limit Image."
                         f"MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): Image size (1600000000 pixels) exceeds limit "
                         f"of {2 * Image.MAX_IMAGE_PIXELS} pixels, could be decompression bomb DOS attack.")):
        with pytest.raises(gr.Error) as err:
            actions.upload({"path": str(tmp_path / name), "orig_name": name, "url": None, "size": None})
        assert err.value.message == message and not err.value.print_exception
    assert decodes == [(32, 32)]  # the truncated file's; neither canvas was allocated
    assert actions.upload(None) is None
    upload = np.asarray(actions.upload({"path": str(tmp_path / "a.png"), "orig_name": "a.png"})["background"])
    assert np.array_equal(upload, np.asarray(actions.load(str(tmp_path / "a.png"))["background"]))
    app = demo.build_app(SundaePipeline(*nets, GRID))
    (event,) = [fn for fn in app.fns.values() if [block.elem_id for block in fn.inputs] == ["upload"]]
    assert event.fn.__name__ == "upload" and event.preprocess is False  # Gradio does not decode the file first
    assert event.show_progress == "hidden"  # a refused file: the message alone, no "Error" badge on the editor


def test_inpaint_event_opens_the_editor_files_itself(nets, tmp_path, monkeypatch):
    """Issue 19: the inpaint event took the editor's files through Gradio's preprocessing, which decoded them
    before our checks: via the API, a non-image background was a server traceback and a small file declaring
    a huge canvas was decoded whole. The editor now hands over paths, opened with the header check."""
    app = demo.build_app(SundaePipeline(*nets, GRID), max_pixels=64 * 64)
    (event,) = [fn for fn in app.fns.values() if getattr(fn.fn, "__name__", "") == "inpaint"]
    editor = event.inputs[0]
    actions = demo.Actions(SundaePipeline(*nets, GRID), max_pixels=64 * 64)
    decodes = count_decodes(monkeypatch)
    (tmp_path / "notes.png").write_text("hello, not an image\n")
    png_declaring(tmp_path / "bomb.png", 9000, 9000, 9000)
    layer = Image.new("RGBA", (32, 32))
    layer.paste((255, 0, 255, 255), (8, 8, 16, 16))
    layer.save(tmp_path / "layer.png")
    sampler = demo.sampler_values(SamplerConfig(steps=4, min_steps=2))
    for name, message in (("notes.png", "Cannot read image notes.png: not an image Pillow can read"),
                          ("bomb.png", "Image bomb.png declares 9000x9000 = 81000000 pixels; the limit is 4096")):
        value = editor.preprocess({"background": {"path": str(tmp_path / name)},
                                   "layers": [{"path": str(tmp_path / "layer.png")}], "composite": None})
        with pytest.raises(gr.Error) as err:
            actions.inpaint(value, 0, 1, 1, 0, 0, *sampler)
        assert err.value.message.startswith(message) and str(tmp_path) not in err.value.message
    assert decodes == []  # neither the text nor the canvas was decoded
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    value = editor.preprocess({"background": {"path": str(tmp_path / "a.png")},
                               "layers": [{"path": str(tmp_path / "layer.png")}], "composite": None})
    _, from_paths, _ = actions.inpaint(value, 0, 1, 1, 0, 0, *sampler)
    pil = {"background": Image.open(tmp_path / "a.png").convert("RGBA"), "layers": [layer]}
    _, from_images, _ = actions.inpaint(pil, 0, 1, 1, 0, 0, *sampler)
    assert np.array_equal(np.asarray(from_paths[0]), np.asarray(from_images[0]))


def test_inpaint_action_regenerates_exactly_the_painted_cells(nets, monkeypatch):
    net, tokenizer = nets
    pipe = SundaePipeline(net, tokenizer, GRID)
    actions = demo.Actions(pipe)
    calls = _recorded(monkeypatch, pipe, "inpaint")
    pixels = np.random.default_rng(1).integers(0, 200, (32, 32, 3), dtype=np.uint8)
    background = Image.fromarray(pixels).convert("RGBA")
    layer = Image.new("RGBA", (32, 32))
    layer.paste((255, 0, 255, 150), (10, 10, 14, 14))  # pixels 10..13: token cells 2..3 (f = 4)
    sampler = SamplerConfig(steps=6, min_steps=2, temperature=1.0, update_proportion=0.9)
    # class 0, guidance 1, 3 completions, no growing, seed 0
    cells, completions, text = actions.inpaint({"background": background, "layers": [layer]}, 0, 1, 3, 0, 0,
                                               *demo.sampler_values(sampler))
    regenerated = np.zeros((32, 32), dtype=bool)
    regenerated[8:16, 8:16] = True
    shown = np.asarray(cells)
    assert (shown[regenerated] == demo.REGENERATED).all() and (shown[~regenerated] == pixels[~regenerated]).all()
    assert len(completions) == 3 and "4 of 64 token cells" in text
    for out in map(np.asarray, completions):
        assert out.shape == (32, 32, 3) and (out[~regenerated] == pixels[~regenerated]).all()
    assert (np.asarray(completions[0])[regenerated] != np.asarray(completions[1])[regenerated]).any()
    # The tab's completions and tokens are the pipeline's for that image, mask, class, sampler and seed.
    mask = torch.zeros(1, 32, 32)
    mask[:, 10:14, 10:14] = 1
    monkeypatch.undo()
    expected = pipe.inpaint(Image.fromarray(pixels), mask, 3, 0, sampler=sampler, seed=0)
    assert torch.equal(calls[-1].tokens, expected.tokens)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(completions, expected.images, strict=True))
    # Grown by one cell: cells 1..4, pixels 4..19.
    cells, completions, text = actions.inpaint({"background": background, "layers": [layer]}, 0, 1, 1, 1, 0,
                                               *demo.sampler_values(sampler))
    regenerated[:] = False
    regenerated[4:20, 4:20] = True
    assert (np.asarray(cells)[regenerated] == demo.REGENERATED).all() and "16 of 64 token cells" in text
    assert (np.asarray(completions[0])[~regenerated] == pixels[~regenerated]).all()


def test_inpaint_action_knows_nothing_of_the_painted_pixels(nets):
    """Issue 19: two uploads equal outside the painted area give the same completions for the same seed."""
    net, tokenizer = nets
    actions = demo.Actions(SundaePipeline(net, tokenizer, GRID))
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    hidden = pixels.copy()
    hidden[6:22, 6:22] = 255 - hidden[6:22, 6:22]  # a different picture under the paint only
    layer = Image.new("RGBA", (32, 32))
    layer.paste((255, 0, 255, 255), (6, 6, 22, 22))
    sampler = demo.sampler_values(SamplerConfig(steps=6, min_steps=2))
    shown = [actions.inpaint({"background": Image.fromarray(x).convert("RGBA"), "layers": [layer]}, 0, 1, 2, 0, 3,
                             *sampler)[1] for x in (pixels, hidden)]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*shown, strict=True))


# ---- text prompts and classifier-free guidance ------------------------------------------------------

def test_condition_values_prompts_per_line_and_guidance_checks(nets, text_pipe):
    label, prompts, scale = demo._condition(text_pipe, ["red apple\n\nrocket", 2.5])
    assert label is None and prompts == ("red apple", "", "rocket") and scale == 2.5  # a blank line: ""
    assert demo._condition(text_pipe, ["", 1]) == (None, ("",), 1.0)  # an empty box: the empty caption
    assert demo._condition(text_pipe, [None, 1])[1] == ("",)
    # Any finite scale, as `sundae sample --guidance-scale` takes it: 0 is unconditional, below 0 pushes away.
    assert demo._condition(text_pipe, ["x", -1.5])[2] == -1.5
    pipe = SundaePipeline(*nets, GRID)
    assert demo._condition(pipe, [3, 4.0]) == (3, None, 4.0)
    assert demo._condition(pipe, [demo.ALL_CLASSES, 1]) == (None, None, 1.0)  # the pipeline cycles the classes
    for value, message in ((None, "Guidance scale is empty"), (float("inf"), "Guidance scale inf: expected finite"),
                           (float("nan"), "Guidance scale nan: expected finite"), (1e39, "too large for the float32")):
        with pytest.raises(gr.Error, match=message):
            demo._condition(pipe, [3, value])
    for value, message in ((None, "Choose a class"), (10, "Class 10 is outside the trained classes 0..9")):
        with pytest.raises(gr.Error, match=message):
            demo._condition(pipe, [value, 1])
    with pytest.raises(gr.Error, match=r"Prompt line 2: not valid text \(surrogates not allowed"):
        demo._condition(text_pipe, ["fine\ncaf\udce9", 1])


def test_generate_with_prompts_samples_the_network_on_their_encoding(nets, text_net, text_pipe):
    """The page's prompts (one per line, cycled over the samples) reach the network as the encoder's features
    of each sample's prompt: the grid equals the sampler's over the network given those features directly.
    Guidance 1 is that same conditional sampling; guidance 3 is the library's guided sampling and differs."""
    tokenizer = nets[1]
    actions = demo.Actions(text_pipe)
    encoder = load_text_encoder(MINILM, "cpu")
    text = encoder.encode(["red apple", "rocket", "red apple"])  # 2 prompts cycled over 3 samples
    sampler = SamplerConfig(steps=6, min_steps=6, temperature=0.8, update_proportion=0.5)

    def page(prompt, scale):  # 3 samples, redraw every 10 steps, seed 5
        *_, (grid, status) = actions.generate(prompt, scale, 3, 10, 5, *demo.sampler_values(sampler))
        assert status.startswith("Done: 3 samples")
        return np.asarray(grid)

    z, _ = sample(lambda z, rows, step: text_net(z, text=tuple(t[rows] for t in text)), (3, 8, 8), V, sampler,
                  generator=_seeded(5, 3))
    guided, _ = sample(class_logits_fn(text_net, None, guidance_scale=3.0, steps=6, text=text), (3, 8, 8), V,
                       sampler, generator=_seeded(5, 3))
    plain = page("red apple\nrocket", 1)
    assert np.array_equal(plain, _decoded_grid(tokenizer, z))
    assert not torch.equal(guided, z)
    assert np.array_equal(page("red apple\nrocket", 3), _decoded_grid(tokenizer, guided))
    assert not np.array_equal(page("a blue car", 1), plain)  # another prompt, the same seed: other samples
    assert not np.array_equal(page("", 1), plain)  # the empty caption is valid, and a condition of its own


def test_inpaint_with_a_prompt_and_guidance(nets, text_net, text_pipe):
    """Inpainting takes the prompts and the scale too: the completions are `inpaint_images`' for the prompt's
    features and that scale, the unpainted cells are the input's, and guidance changes the painted ones."""
    tokenizer = nets[1]
    actions = demo.Actions(text_pipe)
    pixels = np.random.default_rng(2).integers(0, 200, (32, 32, 3), dtype=np.uint8)
    layer = Image.new("RGBA", (32, 32))
    layer.paste((255, 0, 255, 150), (0, 0, 16, 32))  # the left half: token columns 0..3
    editor = {"background": Image.fromarray(pixels).convert("RGBA"), "layers": [layer]}
    sampler = SamplerConfig(steps=5, min_steps=5, temperature=1.0, update_proportion=0.8)

    def completions(scale):  # prompt, scale, 2 completions, no growing, seed 1
        _, images, text = actions.inpaint(editor, "rocket", scale, 2, 0, 1, *demo.sampler_values(sampler))
        assert "32 of 64 token cells" in text
        return np.stack([np.asarray(image) for image in images])

    guided = completions(3.0)
    image, mask = demo._editor_image_and_mask(editor, 3, 32 * 32)
    with torch.inference_mode():
        expected, *_ = inpaint_images(text_net, tokenizer, image, mask, 2, None, _seeded(1, 2), guidance_scale=3.0,
                                      text=load_text_encoder(MINILM, "cpu").encode(["rocket"] * 2), sampler=sampler)
    assert np.array_equal(guided, np.stack([np.asarray(tensor_to_image(x)) for x in expected]))
    assert (guided[:, :, 16:] == pixels[:, 16:]).all()
    assert not np.array_equal(completions(1.0)[:, :, :16], guided[:, :, :16])


def test_text_encoder_problems_are_one_line_errors_at_start(nets, tmp_path):
    """A text generator whose checkpoint names no encoder, or one that cannot load or gives features of another
    width, is refused when the app is built (before any click), with a one-line ValueError."""
    net12 = Hourglass(dataclasses.replace(HOURGLASS_PRESETS["tiny"], num_classes=0, text_dim=12)).eval()
    for meta, message in (({"grid": [8, 8]}, "names no text encoder in its checkpoint"),
                          ({"grid": [8, 8], "text_encoder": str(tmp_path / "gone")},
                           f"cannot load the generator's text encoder {tmp_path / 'gone'}: text encoder folder "
                           f"{tmp_path / 'gone'} does not exist"),
                          (TEXT_META, "text encoder all-MiniLM-L6-v2 gives 384-wide features, the generator "
                           "expects text_dim 12")):
        with pytest.raises(ValueError, match=message) as err:
            demo.build_app(SundaePipeline(net12, nets[1], meta))
        assert len(str(err.value).splitlines()) == 1


# ---- the verb ----------------------------------------------------------------------------------------

def test_demo_verb_help_and_one_line_errors(tmp_path, capsys):
    result = subprocess.run([sys.executable, "-m", "sundae", "demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--run" in result.stdout and "127.0.0.1" in result.stdout
    for argv, expected in ((["demo"], "pass --generator"),
                           (["demo", "--run", tmp_path, "--generator", tmp_path / "g.pt"], "not both"),
                           (["demo", "--run", tmp_path], str(tmp_path))):  # an empty folder: named
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in argv] + ["--device", "cpu"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


def test_demo_verb_loads_a_quickstart_folder(nets, tmp_path, monkeypatch, capsys):
    net, tokenizer = nets
    save_checkpoint(tmp_path / "tokenizer" / "tokenizer.pt", "tokenizer", tokenizer.cfg, tokenizer)
    save_checkpoint(tmp_path / "generator" / "generator.pt", "generator", net.cfg, net,
                    meta={**GRID, "tokenizer": str(tmp_path / "tokenizer" / "tokenizer.pt")})
    served = {}
    monkeypatch.setattr(demo, "serve", lambda app, *args: served.update(app=app, args=args))
    main(["demo", "--run", str(tmp_path), "--port", "7999", "--device", "cpu"])
    assert served["args"] == ("127.0.0.1", 7999, False, 5 * 2048 * 2048)  # localhost, no share link, by default
    assert isinstance(served["app"], gr.Blocks)
    assert "http://127.0.0.1:7999" in capsys.readouterr().out


def test_demo_verb_serves_a_text_conditional_generator(nets, text_net, tmp_path, monkeypatch, capsys):
    tokenizer = nets[1]
    save_checkpoint(tmp_path / "tok.pt", "tokenizer", tokenizer.cfg, tokenizer)
    save_checkpoint(tmp_path / "gen.pt", "generator", text_net.cfg, text_net,
                    meta={**TEXT_META, "tokenizer": str(tmp_path / "tok.pt")})
    served = {}
    monkeypatch.setattr(demo, "serve", lambda app, *args: served.update(app=app))
    main(["demo", "--generator", str(tmp_path / "gen.pt"), "--device", "cpu"])
    assert {"gen-prompt", "gen-guidance", "inp-prompt", "inp-guidance"} <= _elem_ids(served["app"])
    capsys.readouterr()
    # A text generator that names no encoder: one line at start, not a page that fails at the first click.
    save_checkpoint(tmp_path / "bare.pt", "generator", text_net.cfg, text_net,
                    meta={"grid": [8, 8], "tokenizer": str(tmp_path / "tok.pt")})
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--generator", str(tmp_path / "bare.pt"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "names no text encoder" in err, err


# ---- the page in headless Chromium -------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, shared by the module's pages."""
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@contextlib.contextmanager
def _opened(browser, app: gr.Blocks, max_pixels: int):
    """`app` served on a free localhost port and open in a new page of `browser`; closed afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = demo.serve(app, "127.0.0.1", port, max_upload_bytes=demo.upload_limit(max_pixels), block=False)
    outside = []  # requests to other hosts (blob: and data: URLs are the page's own)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.on("request", lambda r: outside.append(r.url) if r.url.startswith(("http:", "https:", "ws:", "wss:"))
            and not r.url.startswith(url.rstrip("/")) else None)
    try:
        page.goto(url)
        page.wait_for_selector("#gen-run")
        yield page
    finally:
        page.close()
        app.close()
    assert outside == []  # the page loads nothing from outside this machine


@pytest.fixture(scope="module")
def page(browser, nets):
    """The class-conditional app, open in headless Chromium."""
    net, tokenizer = nets
    names = [f"class{i}" for i in range(10)]
    app = demo.build_app(SundaePipeline(net, tokenizer, {**GRID, "class_names": names}), max_pixels=64 * 64,
                         max_samples=16)
    with _opened(browser, app, 64 * 64) as page:
        yield page


def _set(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _fetch(page, selector: str) -> list[np.ndarray]:
    """The images shown under `selector`, as served (PNG), as uint8 arrays."""
    return [np.asarray(Image.open(io.BytesIO(page.request.get(img.get_attribute("src")).body())))
            for img in page.locator(selector).all()]


def test_generate_shows_the_requested_grid_and_the_steps_taken(page):
    page.get_by_role("tab", name="Generate").click()
    _set(page, "gen-num", 5)
    _set(page, "gen-steps", 12)
    page.click("#gen-run")
    page.wait_for_function("document.querySelector('#gen-status').innerText.startsWith('Done')", timeout=30_000)
    (grid,) = _fetch(page, "#grid img")
    # 5 samples of 32x32 in ceil(sqrt(5)) = 3 columns -> 2 rows, 2 white pixels around and between.
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3)
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()
    assert (grid[36:68, 70:102] == 255).all()  # the sixth slot is empty
    assert all((grid[2 + r * 34: 34 + r * 34, 2 + c * 34: 34 + c * 34] != 255).any()
               for r, c in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1)))
    status = page.locator("#gen-status").inner_text()
    taken = [int(v) for v in status.rsplit(":", 1)[1].split(",")]
    assert len(taken) == 5 and all(10 <= t <= 12 for t in taken), status  # min steps 10, T = 12


def _upload(page, path: Path) -> None:
    page.reload()
    page.wait_for_selector("#gen-run")
    page.get_by_role("tab", name="Inpaint").click()
    page.wait_for_selector("#editor canvas")
    page.locator("#upload input[type=file]").set_input_files(path)


def test_inpaint_completions_keep_the_unpainted_pixels(page, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)  # never demo.REGENERATED (255, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "input.png")
    _upload(page, tmp_path / "input.png")
    page.locator("#editor").get_by_text("select the draw tool").wait_for(state="hidden", timeout=10_000)
    time.sleep(1.0)  # the canvas lays out the image
    box = page.locator("#editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2  # the image is centred
    page.mouse.move(cx - 10, cy)
    page.mouse.down()
    page.mouse.move(cx + 10, cy, steps=5)
    page.mouse.up()
    _set(page, "inp-num", 2)
    _set(page, "inp-steps", 8)
    page.click("#inp-run")
    page.wait_for_function("document.querySelector('#inp-status').innerText.includes('completions in')",
                           timeout=30_000)
    (cells,) = _fetch(page, "#cells img")
    completions = _fetch(page, "#completions img")
    assert cells.shape == (32, 32, 3) and len(completions) == 2
    regenerated = (cells == demo.REGENERATED).all(-1).reshape(8, 4, 8, 4).all(axis=(1, 3))  # whole 4x4 cells
    assert regenerated[3:5, 3:5].any() and not regenerated[[0, 0, 7, 7], [0, 7, 0, 7]].any(), regenerated
    keep = ~np.repeat(np.repeat(regenerated, 4, 0), 4, 1)
    for out in completions:
        assert out.shape == (32, 32, 3)
        assert (out[keep] == pixels[keep]).all()  # every unpainted cell exactly as uploaded
        assert (out[:8, :8] == pixels[:8, :8]).all() and (out[-8:, -8:] == pixels[-8:, -8:]).all()
    assert (completions[0][~keep] != completions[1][~keep]).any()  # diverse completions


def _error_badges(page) -> int:
    """Gradio's "Error" badges showing on the page's components (a hidden status tracker has class "hide")."""
    return page.locator("[data-testid=status-tracker]:not(.hide) .error").count()


def test_uploads_over_the_limits_are_refused_in_the_page(page, tmp_path, capfd):
    # The fixture's app takes 64x64 = 4096 pixels, and files of 5 bytes per pixel: 20480 bytes.
    noise = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "heavy.png")  # noise does not compress: about 30 kB
    assert (tmp_path / "heavy.png").stat().st_size > 20480
    _upload(page, tmp_path / "heavy.png")
    page.get_by_text("exceed the maximum allowed size").wait_for(timeout=10_000)
    png_declaring(tmp_path / "bomb.png", 9000, 9000, 9000)  # about 10 kB, 81 megapixels
    _upload(page, tmp_path / "bomb.png")
    page.get_by_text("Image bomb.png declares 9000x9000 = 81000000 pixels; the limit is 4096 pixels").wait_for(
        timeout=10_000)
    assert _error_badges(page) == 0
    # Gradio's own check (by the browser's file type) refuses a .txt; text named .png reaches the server.
    (tmp_path / "notes.png").write_text("hello, not an image\n")
    _upload(page, tmp_path / "notes.png")
    page.get_by_text("Cannot read image notes.png: not an image Pillow can read, or its header is damaged "
                     "(it starts with b'hello, not an im')").wait_for(timeout=10_000)
    assert _error_badges(page) == 0
    assert "Traceback" not in capfd.readouterr().err  # the server printed no traceback either


def test_inpaint_without_an_image_says_so_in_the_page(page):
    page.reload()  # an empty editor
    page.wait_for_selector("#gen-run")
    page.get_by_role("tab", name="Inpaint").click()
    page.click("#inp-run")
    page.get_by_text("Upload an image first").wait_for(timeout=10_000)
    assert "Traceback" not in page.content()


def test_a_typed_prompt_and_guidance_scale_reach_the_sampler(browser, text_pipe):
    """On a text-conditional generator's page: two prompts typed on two lines, guidance 3; the grid served is
    the one `Actions.generate` gives for those values (the page's defaults for the rest)."""
    with _opened(browser, demo.build_app(text_pipe, max_samples=8), 64 * 64) as page:
        assert page.locator("#gen-class").count() == 0
        page.locator("#gen-prompt textarea").fill("red apple\nrocket")
        _set(page, "gen-guidance", 3)
        _set(page, "gen-num", 3)
        _set(page, "gen-steps", 6)
        page.click("#gen-run")
        page.wait_for_function("document.querySelector('#gen-status').innerText.startsWith('Done')",
                               timeout=30_000)
        (grid,) = _fetch(page, "#grid img")
    # prompts, guidance 3, 3 samples, redraw every 5, seed 0, T = 6, the pipeline's sampler for the rest
    sampler = demo.sampler_values(dataclasses.replace(text_pipe.sampler, steps=6))
    *_, (expected, _) = demo.Actions(text_pipe).generate("red apple\nrocket", 3, 3, 5, 0, *sampler)
    assert grid.shape == (2 + 2 * 34, 2 + 2 * 34, 3) and np.array_equal(grid, np.asarray(expected))
    *_, (unguided, _) = demo.Actions(text_pipe).generate("red apple\nrocket", 1, 3, 5, 0, *sampler)
    assert not np.array_equal(grid, np.asarray(unguided))  # the scale typed in the page was used
