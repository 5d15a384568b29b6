"""`sundae evaluate` end to end on tiny runs: the numbers against independent computations, the protocol in
the JSON, the Inception network and its missing-weights message, one-line errors."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import fails, run
from sundae.checkpoint import load_tokenizer
from sundae.data import FASHION_MNIST_DIR, ImageFolder, is_idx_dataset
from sundae.eval.inception import FIDInception, inception_features, load_fid_inception
from sundae.eval.metrics import psnr
from sundae.eval.protocol import INCEPTION_FILE, balanced_labels


@pytest.fixture
def runs(pipeline):
    """The tiny tokenizer and class-conditional generator (2 classes) of the shared CLI pipeline."""
    return pipeline


@pytest.fixture
def no_inception(monkeypatch, tmp_path):
    """Point the default Inception location at a file that does not exist."""
    path = tmp_path / "nowhere" / INCEPTION_FILE
    monkeypatch.setenv("SUNDAE_INCEPTION", str(path))
    return path


SAMPLER = ["--num", 8, "--batch-size", 4, "--min-steps", 1, "--classifier-epochs", 4, "--device", "cpu"]


def test_evaluate_reports_values_that_independent_computations_confirm(runs, image_folder, tmp_path, capsys,
                                                                       no_inception):
    out = tmp_path / "ev"
    run("evaluate", "--generator", runs / "gen", "--reference", image_folder, "--steps", "2,3", "--out", out,
        *SAMPLER)
    captured = capsys.readouterr()
    # The missing weights are named with where to put them, and the run goes on without Inception FID.
    assert INCEPTION_FILE in captured.err and str(no_inception) in captured.err
    assert "fid_classifier" in captured.out and "psnr_db" in captured.out
    result = json.loads((out / "evaluation.json").read_text())

    protocol = result["protocol"]
    assert protocol["samples"] == 8 and protocol["steps"] == [2, 3] and protocol["seed"] == 0
    assert protocol["batch_size"] == 4 and protocol["temperature"] == [0.8, 0.8] and protocol["min_steps"] == 1
    assert protocol["reference"]["count"] == 24 and protocol["reference"]["num_classes"] == 2
    assert protocol["image_size"] == [32, 32] and "centre crop" in protocol["reference"]["resizing"]
    assert protocol["tools"]["torch"] == torch.__version__ and protocol["tools"]["torchmetrics"] != "not installed"
    assert protocol["feature_extractors"] == {"classifier": True, "inception": False}
    assert INCEPTION_FILE in result["skipped"]["fid_inception"]

    # Tokenizer numbers recomputed here: encode/decode the same 24 reference images.
    tokenizer = load_tokenizer(runs / "tok" / "tokenizer.pt")
    ref = ImageFolder(image_folder, 32, 3)
    x = torch.stack([ref[i][0] for i in range(len(ref))])
    with torch.no_grad():
        z = tokenizer.encode(x)
        recon = tokenizer.decode(z)
    tok = result["tokenizer"]
    assert tok["psnr_db"] == pytest.approx(psnr(recon, x), abs=1e-4)
    assert tok["codebook_usage"] == pytest.approx(len(np.unique(z.numpy())) / 64)
    from skimage.metrics import structural_similarity
    ssim = np.mean([structural_similarity(x[i].numpy(), recon[i].clamp(-1, 1).numpy(), data_range=2.0, channel_axis=0,
                                          gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                    for i in range(len(x))])
    assert tok["ssim"] == pytest.approx(ssim, abs=1e-4)  # Wang et al.'s valid region, as scikit-image
    assert tok["rfid_classifier"] >= 0 and 0 <= tok["classifier_accuracy_on_reconstructions"] <= 1

    rows = result["samples"]
    assert [r["steps"] for r in rows] == [2, 3]
    for r in rows:
        assert r["fid_classifier"] > 0 and 0 <= r["precision_classifier"] <= 1 and 0 <= r["recall_classifier"] <= 1
        assert 1 <= r["mean_steps_taken"] <= r["steps"] and r["seconds_per_image"] > 0
        assert r["class_accuracy"] in {i / 8 for i in range(9)}  # 8 samples, 4 of each class
    assert 0 <= result["classifier"]["accuracy_on_reference"] <= 1 and not result["classifier"]["loaded"]
    # One panel each for classifier-FID, class accuracy, precision and recall (150 px tall, 70 px of margins).
    assert Image.open(out / "curves.png").size == (640, 4 * 150 + 70)
    assert Image.open(out / "samples.png").size[0] == 2 * 32 + 3 * 2  # one column per class, 2-pixel gaps

    # Same seed, same settings, the saved classifier: the same numbers.
    run("evaluate", "--generator", runs / "gen" / "generator.pt", "--reference", image_folder, "--steps", "2",
        "--out", tmp_path / "again", "--classifier", out / "classifier.pt", *SAMPLER)
    again = json.loads((tmp_path / "again" / "evaluation.json").read_text())
    assert again["classifier"]["loaded"] and again["tokenizer"] == tok
    assert {k: v for k, v in again["samples"][0].items() if k != "seconds_per_image"} == \
        {k: v for k, v in rows[0].items() if k != "seconds_per_image"}
    capsys.readouterr()
    assert "already holds" in fails(capsys, "evaluate", "--generator", runs / "gen", "--reference", image_folder,
                                    "--out", out, *SAMPLER)


@pytest.mark.skipif(not is_idx_dataset(FASHION_MNIST_DIR), reason="Fashion-MNIST idx files not installed")
def test_evaluate_against_fashion_mnist(runs, tmp_path, capsys, no_inception):
    run("evaluate", "--generator", runs / "gen", "--reference", "fashion-mnist", "--reference-limit", 24,
        "--classifier-train-limit", 128, "--steps", 2, "--out", tmp_path, *SAMPLER)
    result = json.loads((tmp_path / "evaluation.json").read_text())
    ref = result["protocol"]["reference"]
    assert (ref["source"], ref["split"], ref["count"], ref["available"]) == ("Fashion-MNIST", "test", 24, 10000)
    assert ref["num_classes"] == 10 and "replicated" in ref["resizing"]  # the tiny tokenizer is RGB
    assert result["classifier"]["train_images"] == 128 and "train split" in result["classifier"]["trained_on"]
    # The generator's 2 classes are not Fashion-MNIST's 10: no class accuracy, and the reason is given.
    assert "class_accuracy" not in result["samples"][0] and "10" in result["skipped"]["class_accuracy"]
    assert not (tmp_path / "curves.png").exists()  # one setting: no curve


def test_evaluate_guidance_scale_changes_the_samples_and_is_recorded(runs, image_folder, tmp_path, no_inception):
    results = {}
    for scale in ("1", "3"):
        out = tmp_path / scale
        run("evaluate", "--generator", runs / "gen", "--reference", image_folder, "--steps", 3, "--out", out,
            "--guidance-scale", scale, "--classifier", tmp_path / "classifier.pt", *SAMPLER)
        results[scale] = json.loads((out / "evaluation.json").read_text())
    assert results["3"]["protocol"]["guidance_scale"] == [3.0, 3.0]
    assert results["1"]["protocol"]["guidance_scale"] == [1.0, 1.0]
    # Same seed, same classifier, same tokenizer numbers: only the guided logits differ, so the samples do.
    assert results["1"]["tokenizer"] == results["3"]["tokenizer"]
    assert results["1"]["samples"][0]["fid_classifier"] != results["3"]["samples"][0]["fid_classifier"]


def test_evaluate_one_line_errors(runs, image_folder, tmp_path, capsys, no_inception):
    gen = runs / "gen"
    assert "is not a folder" in fails(capsys, "evaluate", "--generator", gen, "--reference", tmp_path / "missing",
                                      "--out", tmp_path / "a", *SAMPLER)
    assert "applies to idx folders" in fails(capsys, "evaluate", "--generator", gen, "--reference",
                                             f"{image_folder}:test", "--out", tmp_path / "b", *SAMPLER)
    assert "--inception" in fails(capsys, "evaluate", "--generator", gen, "--reference", image_folder,
                                  "--inception", tmp_path / "none.pth", "--out", tmp_path / "c", *SAMPLER)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:  # after the warning about the missing Inception weights
        run("evaluate", "--generator", gen, "--reference", image_folder, "--classifier", tmp_path / "bad.pt",
            "--out", tmp_path / "d", *SAMPLER)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "warning: Inception FID skipped" in err[0] and len(err) == 2
    assert "error: --classifier" in err[1] and "not a readable classifier" in err[1]
    with pytest.raises(SystemExit):
        run("evaluate", "--generator", gen, "--steps", "4,0", "--out", tmp_path / "e")
    assert "comma-separated" in capsys.readouterr().err


def test_inception_network_loads_a_state_dict_and_gives_2048_features(tmp_path):
    torch.manual_seed(0)
    state = FIDInception().state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # the file's head: ignored
    torch.save(state, tmp_path / INCEPTION_FILE)
    model = load_fid_inception(tmp_path / INCEPTION_FILE)
    gray = torch.rand(1, 1, 28, 28) * 2 - 1
    feats = inception_features(model, gray)
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()
    # Grayscale is replicated: the same features as the 3-channel image.
    torch.testing.assert_close(feats, inception_features(model, gray.repeat(1, 3, 1, 1)))
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_fid_inception(tmp_path / "partial.pth")



def test_evaluate_with_inception_weights_reports_inception_fid(pipeline, image_folder, tmp_path, monkeypatch):
    """The CLI's Inception path. The network itself is tested above; here a cheap stand-in (4x4 average-pooled
    pixels as features) replaces it, since a real Inception pass at 299x299 costs seconds per image here."""
    import sundae.eval.inception

    monkeypatch.setattr(sundae.eval.inception, "load_fid_inception", lambda path, device: path)
    monkeypatch.setattr(sundae.eval.inception, "inception_features",
                        lambda model, x: torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))
    weights = tmp_path / INCEPTION_FILE
    weights.write_bytes(b"stand-in weights")
    run("evaluate", "--generator", pipeline / "gen", "--reference", image_folder, "--inception", weights,
        "--out", tmp_path / "ev", "--steps", 2, *SAMPLER)
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert result["protocol"]["feature_extractors"]["inception"] and "fid_inception" not in result["skipped"]
    assert result["inception"]["sha256"] == hashlib.sha256(b"stand-in weights").hexdigest()
    row = result["samples"][0]
    assert row["fid_inception"] > 0 and 0 <= row["precision_inception"] <= 1 and 0 <= row["recall_inception"] <= 1
    assert result["tokenizer"]["rfid_inception"] > 0


def test_balanced_labels():
    labels = balanced_labels(25, 10)
    assert torch.bincount(labels).tolist() == [3] * 5 + [2] * 5


def test_evaluate_checks_its_arguments_before_any_work(runs, image_folder, tmp_path, capsys, no_inception):
    """Bad --guidance-scale, --num <= k, an unmeasurable setup: one-line errors before the classifier is
    trained, and a failing --overwrite keeps the earlier results."""
    gen, out = runs / "gen", tmp_path / "out"
    base = ("evaluate", "--generator", gen, "--reference", image_folder, "--steps", 2, "--out", out)
    for scale, expected in (("nan", "--guidance-scale nan: expected finite"),
                            ("1e300", "--guidance-scale 1e300: too large for the float32 logits")):
        assert expected in fails(capsys, *base, "--guidance-scale", scale, *SAMPLER)
    assert "--num 3: precision/recall need more than --k 3" in fails(capsys, *base, *SAMPLER, "--num", 3)
    err = fails(capsys, *base, *SAMPLER, "--inception", tmp_path)
    assert f"--inception {tmp_path} is a directory, expected the .pth file ({INCEPTION_FILE})" in err
    assert not out.exists()  # no classifier trained, nothing written
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(image_folder.rglob("*.png"))[:8]:
        (flat / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    err = fails(capsys, "evaluate", "--generator", gen, "--reference", flat, "--out", out, *SAMPLER)
    assert "no sample metric can be measured" in err and "sub-folders" in err and str(no_inception) in err
    run(*base, *SAMPLER)
    result = (out / "evaluation.json").read_text()
    capsys.readouterr()
    assert "--guidance-scale" in fails(capsys, *base, *SAMPLER, "--overwrite", "--guidance-scale", "inf")
    assert "is not a folder" in fails(capsys, *base[:4], tmp_path / "missing", *base[5:], *SAMPLER, "--overwrite")
    assert (out / "evaluation.json").read_text() == result and (out / "samples.png").is_file()


def test_image_folder_reference_limit_takes_a_seeded_subset_of_every_class(image_folder):
    """The folder's files are sorted by class (12 circles, then 12 squares): the first 10 would all be
    circles. The limited subsets are random (seeded, so the same every time) and count their classes."""
    from sundae.eval.protocol import load_reference
    ref = load_reference(str(image_folder), 32, 3, limit=10, classifier_limit=16)
    counts = ref.info["class_counts"]
    assert sum(counts) == 10 and min(counts) > 0 and counts == torch.bincount(ref.labels, minlength=2).tolist()
    assert min(torch.bincount(ref.train_labels, minlength=2).tolist()) > 0 and len(ref.train_labels) == 16
    assert ref.info["subset"] == "random, seed 0" and ref.info["available"] == 24
    again = load_reference(str(image_folder), 32, 3, limit=10, classifier_limit=16)
    assert torch.equal(again.images, ref.images) and torch.equal(again.labels, ref.labels)
    whole = load_reference(str(image_folder), 32, 3)
    assert whole.info["subset"] == "all" and whole.info["class_counts"] == [12, 12]
    # Each kept image is one of the folder's, in file order.
    rows = [int(torch.nonzero((whole.images == x).flatten(1).all(1))[0]) for x in ref.images]
    assert rows == sorted(set(rows))


class _LevelTokenizer:
    """A stand-in tokenizer: one token per pixel, the nearest of 4 grey levels (codebook of 8, so half unused)."""

    class cfg:
        codebook_size = 8

    def encode(self, x):
        return ((x[:, 0] + 1) * 1.5).round().long()  # b H W in 0..3

    def decode(self, z, size):
        assert size == tuple(z.shape[-2:])
        return (z.float() / 1.5 - 1)[:, None]


def test_measure_reconstructions_batch_by_batch_equals_the_whole_set():
    from sundae.eval.metrics import ssim
    from sundae.eval.protocol import measure_reconstructions

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(10, 1, 16, 16, generator=gen) * 2 - 1
    images[:, :, :8] = -1  # the top half black: level 0 is used most
    tokenizer = _LevelTokenizer()
    recon = tokenizer.decode(tokenizer.encode(images), (16, 16))
    measures = {"mean": lambda x: x.mean((1, 2, 3)), "corner": lambda x: x[:, 0, 0, :2]}
    for batch_size in (3, 10, 64):  # 3 does not divide 10
        scores, outputs = measure_reconstructions(tokenizer, images, batch_size, torch.device("cpu"), measures)
        assert scores["psnr_db"] == pytest.approx(psnr(recon, images), rel=1e-9)
        assert scores["ssim"] == pytest.approx(ssim(recon, images), abs=1e-6)
        assert scores["codebook_usage"] == 4 / 8 and scores["tokens"] == 10 * 16 * 16
        torch.testing.assert_close(outputs["mean"], recon.mean((1, 2, 3)))
        assert outputs["corner"].shape == (10, 2) and torch.equal(outputs["corner"], recon[:, 0, 0, :2])
    # Rounding to 4 levels 2/3 apart: every error is at most 1/3, so PSNR > 10 log10(4 / (1/3)^2) = 15.6 dB.
    assert scores["psnr_db"] > 10 * math.log10(36)
