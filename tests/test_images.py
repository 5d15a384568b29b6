"""Real-world image files: every mode, 16-bit data, EXIF orientation, alpha, and the files that must be skipped."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from sundae.checkpoint import save_checkpoint
from sundae.cli import main
from sundae.data import ImageFolder, open_images
from sundae.images import ImageError, image_to_tensor, read_image
from sundae.vqgan import PRESETS as VQ
from sundae.vqgan import VQGAN


def _png(header: bytes, raw: bytes) -> bytes:
    """A PNG file: the IHDR `header`, the rows `raw` (a filter byte before each) deflated, with correct CRCs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def write_png16(path, values: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): `h w` gray or `h w 3` RGB uint16."""
    arr = np.asarray(values, dtype=">u2")
    h, w = arr.shape[:2]
    colour_type = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\x00" + arr[r].tobytes() for r in range(h))  # filter type 0 on every row
    path.write_bytes(_png(struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0), raw))


def png_declaring(path, width: int, height: int, rows: int) -> None:
    """A small PNG whose header declares a `width` x `height` 1-bit grayscale canvas, holding `rows` black
    rows: all of them (`rows` = `height`) is a valid image and a decompression bomb (9000x9000 pixels are
    about 10 kB of file, 81 MB in Pillow's memory and 243 MB as RGB); fewer is a truncated one."""
    raw = (b"\x00" * (1 + -(-width // 8))) * rows  # filter byte 0, then width bits of 0 per row
    path.write_bytes(_png(struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0), raw))


SIXTEEN = np.array([[0, 2570, 30000, 65535]], dtype=np.uint16)
# 8-bit values by 255/65535 scaling, rounded: 2570 = 10 * 257; 30000 * 255 / 65535 = 116.73.
SIXTEEN_AS_8 = [0, 10, 117, 255]


def test_16_bit_grayscale_png_keeps_its_values(tmp_path):
    write_png16(tmp_path / "g16.png", SIXTEEN)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really 16-bit on disk
    assert np.asarray(read_image(tmp_path / "g16.png", 1)).tolist() == [SIXTEEN_AS_8]
    assert np.asarray(read_image(tmp_path / "g16.png", 3))[0, :, 1].tolist() == SIXTEEN_AS_8


def test_16_bit_rgb_png_keeps_its_values(tmp_path):
    rgb = np.stack([SIXTEEN, 65535 - SIXTEEN, np.full_like(SIXTEEN, 2570)], -1)
    write_png16(tmp_path / "c16.png", rgb)
    out = np.asarray(read_image(tmp_path / "c16.png", 3))
    assert out[0, :, 0].tolist() == SIXTEEN_AS_8
    assert out[0, :, 1].tolist() == [255 - v for v in SIXTEEN_AS_8]
    assert out[0, :, 2].tolist() == [10] * 4


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_every_mode_by_the_documented_rules(tmp_path):
    # L -> RGB replicates; RGB -> L is ITU-R 601 luma: red 255 -> 0.299 * 255 = 76.
    assert np.asarray(read_image(_save(Image.new("L", (2, 2), 100), tmp_path / "l.png"), 3))[0, 0].tolist() == [100] * 3
    assert np.asarray(read_image(_save(Image.new("RGB", (2, 2), (255, 0, 0)), tmp_path / "r.png"), 1))[0, 0] == 76
    # Alpha composited onto white: transparent -> 255, opaque keeps its value, alpha 51 mixes 20 % of it.
    la = Image.new("LA", (3, 1))
    la.putdata([(0, 0), (0, 255), (0, 51)])
    assert np.asarray(read_image(_save(la, tmp_path / "la.png"), 1))[0].tolist() == [255, 0, 204]
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(10, 20, 30, 0), (10, 20, 30, 255)])
    assert np.asarray(read_image(_save(rgba, tmp_path / "rgba.png"), 3))[0].tolist() == [[255] * 3, [10, 20, 30]]
    # Palette images, with and without a transparent entry.
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putdata([0, 1])
    assert np.asarray(read_image(_save(p, tmp_path / "p.png"), 3))[0].tolist() == [[10, 20, 30], [200, 100, 50]]
    assert np.asarray(read_image(_save(p, tmp_path / "pt.png", transparency=0), 3))[0].tolist() == \
        [[255, 255, 255], [200, 100, 50]]
    # CMYK (TIFF, lossless): no ink is white, full black ink is black.
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (0, 0, 0, 255)])
    assert np.asarray(read_image(_save(cmyk, tmp_path / "cmyk.tif"), 3))[0].tolist() == [[255] * 3, [0] * 3]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("L", (3, 2), 0)  # stored 3 wide, 2 high
    img.putpixel((0, 0), 255)  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "phone.png", exif=exif)
    out = np.asarray(read_image(tmp_path / "phone.png", 1))
    assert out.shape == (3, 2)  # displayed 2 wide, 3 high
    assert out[0, 1] == 255 and out.sum() == 255  # a clockwise turn takes the top-left corner to the top-right


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    Image.new("L", (12, 12)).save(tmp_path / "warn.png")  # 144 pixels: over the limit, under twice it
    Image.new("L", (16, 16)).save(tmp_path / "error.png")  # 256 pixels: over twice the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for name in ("warn.png", "error.png"):
        with pytest.raises(ImageError, match=f"{name} refused as a possible decompression bomb.*MAX_IMAGE_PIXELS=100"):
            read_image(tmp_path / name, 3)


def test_bad_files_are_one_line_errors_saying_what_is_wrong(tmp_path):
    (tmp_path / "page.jpg").write_bytes(b"<!DOCTYPE html>\n<html><body>Not found</body></html>\n")
    (tmp_path / "empty.png").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    full = (tmp_path / "full.png").read_bytes()
    (tmp_path / "half.png").write_bytes(full[: len(full) // 2])  # the header and half the pixel data
    (tmp_path / "header.png").write_bytes(full[:20])  # cut inside the header
    (tmp_path / "chunk.png").write_bytes(full[:40])  # cut after the header, inside the next chunk's name
    expected = {"page.jpg": "not an image Pillow can read, or its header is damaged (it starts with "
                            "b'<!DOCTYPE html>\\n')",
                "empty.png": "empty file", "half.png": "image file is truncated",
                "header.png": "Truncated File Read",
                "chunk.png": "not an image Pillow can read, or its header is damaged (it starts with "
                             "b'\\x89PNG\\r\\n\\x1a\\n\\x00\\x00\\x00\\rIHDR')"}
    for name, reason in expected.items():
        with pytest.raises(ImageError) as err:
            read_image(tmp_path / name, 3, max_pixels=64 * 64)
        assert str(err.value) == f"cannot read image {tmp_path / name}: {reason}"


def count_decodes(monkeypatch) -> list:
    """Record the size of every image whose pixels Pillow starts to decode: `ImageFile.load_prepare`, where
    it allocates the pixel memory (the spy then goes on as Pillow does)."""
    calls, prepare = [], ImageFile.ImageFile.load_prepare
    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", lambda self: calls.append(self.size) or prepare(self))
    return calls


def test_max_pixels_refuses_a_huge_canvas_from_its_header_before_decoding(tmp_path, monkeypatch):
    decodes = count_decodes(monkeypatch)
    png_declaring(tmp_path / "square.png", 64, 64, 64)  # exactly the limit: read
    png_declaring(tmp_path / "wide.png", 65, 64, 64)  # one column over
    png_declaring(tmp_path / "bomb.png", 9000, 9000, 9000)  # valid, under Pillow's limit of 89 megapixels
    png_declaring(tmp_path / "cut.png", 9000, 9000, 1)  # the header and one row
    assert (tmp_path / "bomb.png").stat().st_size < 20_000
    assert np.asarray(read_image(tmp_path / "square.png", 3, max_pixels=64 * 64)).shape == (64, 64, 3)
    assert decodes == [(64, 64)]  # the spy sees decoding
    for name, size in (("wide.png", "65x64 = 4160"), ("bomb.png", "9000x9000 = 81000000"),
                       ("cut.png", "9000x9000 = 81000000")):
        with pytest.raises(ImageError) as err:
            read_image(tmp_path / name, 3, max_pixels=64 * 64)
        assert str(err.value) == f"image {tmp_path / name} declares {size} pixels; the limit is 4096 pixels"
    assert decodes == [(64, 64)]  # nothing refused was decoded
    # Without a limit such a file is decoded whole: Pillow fills the rows the file lacks.
    png_declaring(tmp_path / "cut500.png", 500, 500, 1)
    assert np.asarray(read_image(tmp_path / "cut500.png", 3)).shape == (500, 500, 3)
    assert decodes == [(64, 64), (500, 500)]


def test_a_canvas_over_pillows_limit_is_refused_as_a_bomb_before_decoding(tmp_path, monkeypatch):
    decodes = count_decodes(monkeypatch)
    png_declaring(tmp_path / "huge.png", 40000, 40000, 1)  # 1.6 gigapixels, over twice Pillow's limit
    for max_pixels in (None, 64 * 64, 2 * 10 ** 9):  # Pillow's check comes first, whatever our limit
        with pytest.raises(ImageError) as err:
            read_image(tmp_path / "huge.png", 3, max_pixels=max_pixels)
        message = str(err.value)
        assert message.startswith(f"image {tmp_path / 'huge.png'} refused as a possible decompression bomb "
                                  f"(Pillow's limit Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): ")
        assert "1600000000 pixels" in message and len(message.splitlines()) == 1
    assert decodes == []


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """One file of each kind a scraped folder holds; returns (folder, good names, bad names in sorted order)."""
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 36, 3)).astype(np.uint8)
    rgb = Image.fromarray(pixels)
    good = {
        "a_rgb.png": rgb, "b_l.png": rgb.convert("L"), "c_la.png": rgb.convert("LA"),
        "d_p.png": rgb.convert("P"), "e_rgba.png": rgb.convert("RGBA"), "f_cmyk.tif": rgb.convert("CMYK"),
        "g_rgb.jpg": rgb,
    }
    for name, img in good.items():
        img.save(root / name)
    Image.fromarray(pixels[:, :, 0]).convert("P").save(root / "h_pt.png", transparency=3)
    write_png16(root / "i_gray16.png", np.asarray(good["b_l.png"]).astype(np.uint16) * 257)
    write_png16(root / "j_rgb16.png", pixels.astype(np.uint16) * 257)
    good_names = sorted(list(good) + ["h_pt.png", "i_gray16.png", "j_rgb16.png"])
    full = (root / "a_rgb.png").read_bytes()
    (root / "k_truncated.png").write_bytes(full[: len(full) // 2])
    (root / "l_empty.png").write_bytes(b"")
    (root / "m_notes.txt").write_text("not an image\n")
    (root / "n_corrupt.png").write_bytes(full[:40] + bytes(rng.integers(0, 256, 300).astype(np.uint8)))
    Image.fromarray(pixels[:20, :20]).save(root / "o_small.png")  # under the 32-pixel crop
    (root / ".hidden.png").write_bytes(b"")  # hidden files are not looked at
    bad = ["k_truncated.png", "l_empty.png", "m_notes.txt", "n_corrupt.png", "o_small.png"]
    return root, good_names, bad


def test_image_folder_skips_bad_files_with_a_warning_each_and_a_count(messy_folder, caplog):
    root, good, bad = messy_folder
    ds = ImageFolder(root, 32, 3)
    assert [p.name for p, _ in ds.files] == good
    assert [p.name for p, _ in ds.skipped] == bad
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == len(bad) + 1
    for name, line in zip(bad, warnings):
        assert name in line
    assert "smaller than the 32-pixel crop" in warnings[4] and "empty file" in warnings[1]
    assert warnings[-1].startswith(f"skipped {len(bad)} of {len(good) + len(bad)} files under {root}")
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.shape == (3, 32, 32) and label == 0 and -1 <= x.min() and x.max() <= 1
    # The 16-bit copies hold the same 8-bit pixels as the RGB file, so they crop to the same tensor.
    names = [p.name for p, _ in ds.files]
    assert torch.equal(ds[names.index("j_rgb16.png")][0], ds[names.index("a_rgb.png")][0])
    assert torch.equal(ImageFolder(root, 32, 1)[names.index("i_gray16.png")][0],
                       ImageFolder(root, 32, 1)[names.index("b_l.png")][0])  # and it is not all white


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.pt"
    torch.manual_seed(0)
    model = VQGAN(VQ["tiny"])
    save_checkpoint(path, "tokenizer", model.cfg, model, ema=None)
    return path


def test_tokenize_a_messy_folder(messy_folder, tiny_tokenizer, tmp_path, capsys):
    root, good, bad = messy_folder
    main(["tokenize", "--tokenizer", str(tiny_tokenizer), "--data", str(root), "--out", str(tmp_path / "t"),
          "--device", "cpu"])
    assert np.load(tmp_path / "t" / "tokens.npy").shape == (len(good), 8, 8)
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("sundae tokenize: warning: ")]
    assert len(warnings) == len(bad) + 1 and all(name in line for name, line in zip(bad, warnings))
    assert "Traceback" not in "\n".join(err)
    # --strict: the first bad file (sorted order) is an error naming it, nothing is written.
    with pytest.raises(SystemExit) as exit_:
        main(["tokenize", "--tokenizer", str(tiny_tokenizer), "--data", str(root), "--out", str(tmp_path / "s"),
              "--device", "cpu", "--strict"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(root / bad[0]) in err and "--strict" in err
    assert not (tmp_path / "s").exists()


def test_unusable_inputs_are_named(tmp_path):
    Image.new("F", (4, 4), 0.5).save(tmp_path / "float.tif")
    with pytest.raises(ImageError, match="float.tif is a floating-point image"):
        read_image(tmp_path / "float.tif", 3)
    with pytest.raises(ValueError, match="channels must be 1 or 3, got 4"):
        read_image(tmp_path / "float.tif", 4)
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no usable images found under .*only \(1 file, 1 skipped\)"):
        ImageFolder(tmp_path / "only", 32, 3)


def test_top_level_files_beside_class_folders_are_counted_not_silently_dropped(tmp_path, tiny_tokenizer, caplog,
                                                                              capsys):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8))
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        img.save(tmp_path / cls / "a.png")
    img.save(tmp_path / "loose1.png")
    (tmp_path / "loose2.txt").write_text("notes\n")
    (tmp_path / ".DS_Store").write_bytes(b"")  # hidden: not counted
    ds = ImageFolder(tmp_path, 32, 3)
    assert ds.classes == ["cat", "dog"] and [(p.parent.name, y) for p, y in ds.files] == [("cat", 0), ("dog", 1)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "sundae" and r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"ignored 2 file(s) directly in {tmp_path} (e.g. loose1.png)")
    assert "2 class sub-folder(s) define the labels" in warnings[0]
    with pytest.raises(ImageError, match=r"ignored 2 file\(s\) directly in .*--strict"):
        ImageFolder(tmp_path, 32, 3, strict=True)
    # Through the CLI: the warning line, and --strict makes it a one-line error.
    main(["tokenize", "--tokenizer", str(tiny_tokenizer), "--data", str(tmp_path), "--out", str(tmp_path / ".t"),
          "--device", "cpu"])
    err = capsys.readouterr().err
    assert "sundae tokenize: warning: ignored 2 file(s) directly in" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["tokenize", "--tokenizer", str(tiny_tokenizer), "--data", str(tmp_path), "--out", str(tmp_path / ".s"),
              "--device", "cpu", "--strict"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ignored 2 file(s)" in err


def _write_idx(path, array: np.ndarray) -> None:
    """An uncompressed idx file of unsigned bytes: magic 0 0 8 ndim, big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_idx_images_are_replicated_for_an_rgb_tokenizer(tmp_path, tiny_tokenizer):
    gray = np.random.default_rng(2).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", gray)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([7, 1, 7]))
    one, three = open_images(tmp_path, 32, 1), open_images(tmp_path, 32, 3)
    x1, y1 = one[0]
    x3, y3 = three[0]
    assert x1.shape == (1, 32, 32) and x3.shape == (3, 32, 32) and y1 == y3 == 7
    # The grayscale-file rule: the same gray image saved as a PNG and read for 3 channels gives 3 equal
    # channels; the idx item holds those pixels at the centre (2-pixel padding of -1 around 28x28).
    Image.fromarray(gray[0]).save(tmp_path / "gray.png")
    from_file = image_to_tensor(read_image(tmp_path / "gray.png", 3))
    assert torch.equal(x3[:, 2:30, 2:30], from_file)
    assert all(torch.equal(x3[c], x1[0]) for c in range(3)) and x3[:, :2].eq(-1).all()
    # The RGB tokenizer tokenizes the idx folder (it used to be refused).
    main(["tokenize", "--tokenizer", str(tiny_tokenizer), "--data", str(tmp_path), "--out", str(tmp_path / "t"),
          "--device", "cpu"])
    assert np.load(tmp_path / "t" / "tokens.npy").shape[1:] == (8, 8)
