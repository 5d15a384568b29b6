"""Captioned image folders (metadata.jsonl, .txt sidecars) and the text-to-image chain through the CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import fails, run
from sundae.data import ImageFolder
from sundae.images import read_captions
from sundae.tokens import TokenDataset


@pytest.fixture()
def captioned(tmp_path, image_folder):
    """The session's circles/squares folder, flattened: metadata.jsonl captions most, sidecars two."""
    root = tmp_path / "captioned"
    root.mkdir()
    for i, path in enumerate(sorted(image_folder.rglob("*.png"))[:8]):
        shutil.copy(path, root / f"{i}.png")
    lines = [{"file_name": f"{i}.png", "text": f"shape number {i}", "extra": 1} for i in range(5)]
    lines.append({"file_name": "5.png", "text": ""})  # the empty caption is valid
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    (root / "6.txt").write_text("a sidecar caption\n")
    return root  # 7.png has no caption


def test_metadata_and_sidecar_captions(captioned, caplog):
    ds = ImageFolder(captioned, 32, 3)
    assert [p.name for p, _ in ds.files] == [f"{i}.png" for i in range(8)] and not ds.skipped  # no .txt/.jsonl tried
    assert ds.captions == [f"shape number {i}" for i in range(5)] + ["", "a sidecar caption", ""]
    assert "1 of 8 images" in caplog.text and "7.png" in caplog.text
    assert read_captions(captioned.parent / "nothing", []) is None


def test_class_folders_keep_their_labels_with_sidecars(image_folder, tmp_path):
    root = tmp_path / "classes"
    shutil.copytree(image_folder, root)
    (root / "squares" / "03.txt").write_text("a square")
    ds = ImageFolder(root, 32, 3)
    assert ds.classes == ["circles", "squares"] and [label for _, label in ds.files] == [0] * 12 + [1] * 12
    assert ds.captions[12 + 3] == "a square" and ds.captions.count("") == 23


def test_metadata_in_class_sub_folders_captions_their_images(image_folder, tmp_path):
    """As in a Hugging Face imagefolder: a metadata.jsonl in a sub-folder names files relative to itself."""
    root = tmp_path / "classes"
    shutil.copytree(image_folder, root)
    (root / "squares" / "metadata.jsonl").write_text('{"file_name": "03.png", "text": "a square"}\n')
    (root / "metadata.jsonl").write_text('{"file_name": "circles/01.png", "text": "a circle"}\n')
    ds = ImageFolder(root, 32, 3)
    assert [label for _, label in ds.files] == [0] * 12 + [1] * 12 and len(ds) == 24
    assert ds.captions[1] == "a circle" and ds.captions[12 + 3] == "a square" and ds.captions.count("") == 22
    (root / "metadata.jsonl").write_text('{"file_name": "squares/03.png", "text": "again"}\n')
    twice = r"squares/metadata.jsonl line 1: .03.png. is listed twice \(also in .*classes/metadata.jsonl\)"
    with pytest.raises(ValueError, match=twice):
        ImageFolder(root, 32, 3)


@pytest.mark.parametrize("line,message", [
    ("{not json", "line 2: not valid JSON"),
    ('{"file_name": "0.png"}', 'line 2: expected an object with string fields "file_name" and "text"'),
    ('["0.png", "x"]', "line 2: expected an object"),
    ('{"file_name": "gone.png", "text": "x"}', "line 2: image 'gone.png' does not exist"),
    ('{"file_name": "../x.png", "text": "x"}', "is outside"),
    ('{"file_name": "0.png", "text": "again"}', "line 2: '0.png' is listed twice"),
])
def test_bad_metadata_lines_name_the_file_and_line(tmp_path, line, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "0.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "ok"}\n' + line + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        read_captions(tmp_path, [tmp_path / "0.png"])
    assert str(tmp_path / "metadata.jsonl") in str(err.value)


def test_caption_in_both_places_or_not_utf8_is_an_error(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "0.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "ok"}\n')
    (tmp_path / "0.txt").write_text("also")
    with pytest.raises(ValueError, match="keep one of them"):
        read_captions(tmp_path, [tmp_path / "0.png"])
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "0.txt").write_bytes(b"\xff\xfe caption")
    with pytest.raises(ValueError, match="0.txt is not UTF-8"):
        read_captions(tmp_path, [tmp_path / "0.png"])


def test_byte_order_marks_are_dropped_and_bad_text_names_its_line(tmp_path):
    for i in range(3):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{i}.png")
    images = [tmp_path / f"{i}.png" for i in range(3)]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "caf\u00e9"}\n', encoding="utf-8-sig")
    (tmp_path / "1.txt").write_text("a sidecar\n", encoding="utf-8-sig")  # Notepad's UTF-8
    assert read_captions(tmp_path, images) == ["caf\u00e9", "a sidecar", ""]
    lines = ['{"file_name": "0.png", "text": "ok"}', '{"file_name": "2.png", "text": "caf\u00e9"}']
    (tmp_path / "metadata.jsonl").write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(ValueError, match=r"metadata.jsonl is not UTF-8 text: line 2: .*byte 0xe9"):
        read_captions(tmp_path, images)
    (tmp_path / "metadata.jsonl").write_text(lines[0] + '\n{"file_name": "2.png", "text": "\\ud800x"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl line 2: not valid text \(surrogates not allowed"):
        read_captions(tmp_path, images)


def test_text_to_image_chain(captioned, tmp_path, capsys):
    """tokenize stores the encoder's features once; train makes a text model; sample takes --prompt with
    guidance; a class-only flag on it, or a prompt for a model without text, is a one-line error."""
    run("train-vqgan", "--data", captioned, "--out", tmp_path / "tok", "--preset", "tiny", "--set", "steps=2",
        "--set", "batch_size=4", "--device", "cpu")
    tok = tmp_path / "tok" / "tokenizer.pt"
    run("tokenize", "--tokenizer", tok, "--data", captioned, "--out", tmp_path / "tokens", "--device", "cpu")
    folder = tmp_path / "tokens"
    captions = json.loads((folder / "captions.json").read_text())
    assert captions[5] == "" and captions[6] == "a sidecar caption" and len(captions) == 8
    features, mask = np.load(folder / "text_features.npy"), np.load(folder / "text_mask.npy")
    meta = json.loads((folder / "meta.json").read_text())
    assert features.dtype == np.float16 and features.shape == (8, meta["text_len"], 384) and meta["text_dim"] == 384
    # Word pieces + [CLS] and [SEP]: the empty caption has 2 real tokens, padding is zero.
    assert mask[5].sum() == 2 and mask.sum(1).max() == meta["text_len"] and not features[~mask].any()
    ds = TokenDataset(folder)
    assert len(ds[0]) == 5 and ds[0][2].shape == (meta["text_len"], 384)
    run("train", "--tokens", folder, "--out", tmp_path / "gen", "--preset", "tiny", "--set", "steps=2",
        "--set", "batch_size=4", "--set", "sample_every=2", "--device", "cpu")
    ckpt = torch.load(tmp_path / "gen" / "generator.pt", weights_only=True)
    assert ckpt["config"]["text_dim"] == 384 and ckpt["meta"]["text_encoder"] == "all-MiniLM-L6-v2"
    gen = tmp_path / "gen" / "generator.pt"
    run("sample", "--generator", gen, "--out", tmp_path / "s", "--num", 3, "--steps", 3, "--prompt", "shape number 1",
        "--prompt", "", "--guidance-scale", "2", "--device", "cpu")
    assert len(list((tmp_path / "s" / "samples").iterdir())) == 3
    capsys.readouterr()
    assert "pass --prompt" in fails(capsys, "sample", "--generator", gen, "--out", tmp_path / "t", "--device", "cpu")
    err = fails(capsys, "sample", "--generator", gen, "--out", tmp_path / "t", "--prompt", "caf\udce9",
                "--device", "cpu")
    assert "--prompt 'caf\\udce9': not valid text (surrogates not allowed" in err  # a Latin-1 byte in argv
    assert "has no classes: it is text-conditional, use --prompt" in fails(
        capsys, "sample", "--generator", gen, "--out", tmp_path / "t", "--class", 0, "--prompt", "x", "--device", "cpu")
    run("train", "--tokens", folder, "--out", tmp_path / "plain", "--preset", "tiny", "--set", "steps=1",
        "--set", "batch_size=4", "--set", "text_dim=0", "--device", "cpu")
    capsys.readouterr()
    assert "not text-conditional" in fails(capsys, "sample", "--generator", tmp_path / "plain" / "generator.pt",
                                           "--out", tmp_path / "u", "--prompt", "x", "--device", "cpu")


def test_emoji_renderer(tmp_path):
    """Real glyphs of the installed font: colour images on white with the Unicode names as captions."""
    from sundae.emoji import emoji_code_points, render_emoji, write_emoji_folder
    found = dict(emoji_code_points())
    assert 1200 < len(found) < 1600  # "about 1,300" single-code-point emoji in Noto Color Emoji
    assert found[0x1F600] == "grinning face" and found[0x1F34E] == "red apple" and 0x41 not in found
    apple = np.asarray(render_emoji("\U0001F34E", 32)).astype(int)
    assert apple.shape == (32, 32, 3) and (apple[0, 0] == 255).all()  # white margin
    red = (apple[..., 0] > 150) & (apple[..., 1] < 80) & (apple[..., 2] < 80)
    assert red.sum() > 100  # a red apple is mostly red
    assert write_emoji_folder(tmp_path, 16, limit=5) == 5
    ds = ImageFolder(tmp_path, 16, 3)
    assert len(ds) == 5 and ds.captions[0] == found[min(found)] and all(ds.captions)


def test_emoji_rerender_replaces_the_old_one_and_bad_arguments_are_one_line_errors(tmp_path):
    import subprocess
    import sys
    from sundae.emoji import write_emoji_folder
    out = tmp_path / "emoji"
    assert write_emoji_folder(out, 8, limit=4) == 4
    with pytest.raises(ValueError, match="is not empty"):
        write_emoji_folder(out, 8, limit=2)
    assert write_emoji_folder(out, 8, limit=2, overwrite=True) == 2
    assert len(list(out.glob("*.png"))) == 2 and len(ImageFolder(out, 8, 3)) == 2  # no stale PNG of the first
    (tmp_path / "junk.ttf").write_bytes(b"not a font")
    script = [sys.executable, Path(__file__).parent.parent / "examples" / "render_emoji.py", "--out", tmp_path / "x"]
    for extra, message in ((["--limit", "-1"], "limit must be >= 0"), (["--size", "0"], "size must be >= 1"),
                           (["--font", tmp_path / "none.ttf"], "not found"),
                           (["--font", tmp_path / "junk.ttf"], "is not a font file"),
                           (["--out", out], "is not empty")):
        done = subprocess.run(script + extra, capture_output=True, text=True)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr


def test_emoji_quickstart_tiny(tmp_path, capsys):
    run("quickstart", "--dataset", "emoji", "--preset", "tiny", "--out", tmp_path / "qs", "--device", "cpu")
    qs = tmp_path / "qs"
    metrics = json.loads((qs / "metrics.json").read_text())
    assert metrics["dataset"]["images"] == 24 and metrics["text_encoder"] == "all-MiniLM-L6-v2"
    assert (qs / "prompts.txt").read_text().splitlines() == ["grinning face", "rocket"]
    # Two rows (prompts) of 1 real emoji + 2 samples, 32-pixel cells with 2-pixel gaps.
    for name in ("prompts.png", "prompts_unguided.png"):
        assert Image.open(qs / name).size == (2 + 3 * 34, 2 + 2 * 34)
    capsys.readouterr()
    assert "--data is for the fashion" in fails(capsys, "quickstart", "--dataset", "emoji", "--data", tmp_path,
                                                "--out", tmp_path / "x")
