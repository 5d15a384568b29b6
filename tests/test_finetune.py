"""Fine-tuning: `--init-from` / `init_from=` start a new run (step 0, fresh optimizer and schedule) from the
weights of a checkpoint, run folder, export or bundle, keeping the architecture; new classes get new rows."""

import dataclasses
import hashlib
import json

import pytest
import torch

from cli_helpers import SET_TINY_VQ, fails, run, write_random_tokens
from sundae import SamplerConfig, SundaePipeline
from sundae.checkpoint import load_checkpoint, load_generator
from sundae.distributed import Dist
from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Hourglass
from sundae.losses import PatchDiscriminator
from sundae.runs import start_from
from sundae.tokens import TokenDataset
from sundae.train import GENERATOR_TRAIN_PRESETS, VQGAN_TRAIN_PRESETS, train_generator, train_vqgan
from sundae.vqgan import PRESETS as VQ
from sundae.vqgan import VQGAN

pytestmark = pytest.mark.usefixtures("one_thread")
ONE = Dist()  # one process on the CPU
CFG = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=4, batch_size=4, save_every=2, sample_every=100)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny class-conditional generator (3 classes) trained 4 steps on random tokens; its run folder."""
    root = tmp_path_factory.mktemp("source")
    (root / "tokens").mkdir()
    ds = TokenDataset(write_random_tokens(root / "tokens", 24, 3))
    train_generator(dataclasses.replace(HG["tiny"], num_classes=3), CFG, ds, root / "run", {"grid": [4, 4]},
                    progress=False)
    return root / "run"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_new_classes_get_new_rows_and_the_null_class_keeps_its_own(source, tmp_path):
    src = load_checkpoint(source, "generator")
    old = src["model"]["class_embedding.embedding.weight"]  # rows: classes 0, 1, 2, then the null class
    torch.manual_seed(5)
    model = Hourglass(dataclasses.replace(HG["tiny"], num_classes=5))
    ema = Hourglass(model.cfg).requires_grad_(False)
    fresh = model.class_embedding.embedding.weight.detach().clone()
    record = start_from(source, "generator", model.cfg, {"model": model}, ema, {}, tmp_path, ONE)
    rows = model.class_embedding.embedding.weight.detach()
    assert rows.shape == (6, 32)
    assert torch.equal(rows[:3], old[:3])  # the trained classes
    assert torch.equal(rows[5], old[3])  # the null class, moved to the new last index
    assert torch.equal(rows[3:5], fresh[3:5])  # the new classes: this model's own fresh initialisation
    assert not torch.equal(rows[3], old[3])
    ema_rows = ema.class_embedding.embedding.weight
    assert torch.equal(ema_rows[:3], src["ema"]["class_embedding.embedding.weight"][:3])
    assert torch.equal(model.to_logits.weight.detach(), src["model"]["to_logits.weight"])
    assert torch.equal(ema.to_logits.weight, src["ema"]["to_logits.weight"])
    assert record["sha256"] == _sha256(source / "generator.pt") and record["step"] == 4


def test_fine_tuning_starts_at_step_0_changes_the_weights_and_still_samples(source, tmp_path):
    (tmp_path / "tokens").mkdir()
    ds = TokenDataset(write_random_tokens(tmp_path / "tokens", 16, 5))  # 2 more classes than the source
    cfg = dataclasses.replace(CFG, steps=2, warmup_steps=4, save_every=1)
    out = train_generator(dataclasses.replace(HG["tiny"], num_classes=5), cfg, ds, tmp_path / "ft",
                          {"grid": [4, 4]}, progress=False, init_from=source)
    ckpt, src = torch.load(out, weights_only=True), load_checkpoint(source, "generator")
    assert ckpt["step"] == 2
    assert sorted(p.name for p in (tmp_path / "ft" / "checkpoints").iterdir()) == ["step_0000001.pt",
                                                                                   "step_0000002.pt"]
    # A fresh optimizer: Adam has counted this run's 2 steps, not the source's 4 more.
    assert {float(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2.0}
    # A fresh schedule: after 2 steps of a 4-step warm-up the lr is 3/4 of the peak (the lr for step 2, 0-based).
    log = [json.loads(line) for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["lr"] == pytest.approx(0.75 * cfg.lr)
    assert log[0] == {"step": 0, "init_from": str((source / "generator.pt").resolve()),
                      "init_sha256": _sha256(source / "generator.pt")}
    assert ckpt["init"]["sha256"] == _sha256(source / "generator.pt")
    changed = [k for k in src["model"] if k != "class_embedding.embedding.weight"
               and not torch.equal(src["model"][k], ckpt["model"][k])]
    assert "to_logits.weight" in changed and "token_embedding.weight" in changed
    net, meta = load_generator(out)
    pipe = SundaePipeline(net, VQGAN(dataclasses.replace(VQ["tiny"], codebook_size=64)).eval(), meta)
    images = pipe(num=2, class_labels=[1, 4], seed=0, sampler=SamplerConfig(steps=4),
                  output_type="pt", progress=False).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_an_architecture_mismatch_names_the_field(source, tmp_path):
    (tmp_path / "tokens").mkdir()
    ds = TokenDataset(write_random_tokens(tmp_path / "tokens", 16, 3))
    for change, field in ((dict(dim=64, num_classes=3), "dim is 32 there, 64 here"),
                          (dict(num_classes=2), "num_classes is 3 there, 2 here"),
                          (dict(num_classes=3, codebook_size=128), "codebook_size is 64 there, 128 here")):
        with pytest.raises(ValueError, match=field):
            train_generator(dataclasses.replace(HG["tiny"], **change), CFG, ds, tmp_path / "ft", {"grid": [4, 4]},
                            progress=False, init_from=source)


def test_cli_fine_tunes_a_bundle_and_resume_wins(pipeline, tmp_path, capsys):
    run("export", pipeline / "gen", tmp_path / "bundle")
    out = tmp_path / "ft"
    args = ["train", "--tokens", pipeline / "tokens", "--out", out, "--preset", "tiny", "--set", "batch_size=4",
            "--set", "sample_every=100", "--init-from", tmp_path / "bundle", "--device", "cpu"]
    run(*args, "--set", "steps=2")
    first = torch.load(out / "generator.pt", weights_only=True)
    weights = (tmp_path / "bundle" / "model.safetensors")
    assert first["step"] == 2 and first["init"]["sha256"] == _sha256(weights)
    source = load_checkpoint(tmp_path / "bundle", "generator")["model"]
    assert not torch.equal(first["model"]["to_logits.weight"], source["to_logits.weight"])
    # The same command with --resume continues this run (the source is not read again) ...
    capsys.readouterr()
    run(*args, "--set", "steps=3", "--resume")
    assert "--init-from" in capsys.readouterr().err
    resumed = torch.load(out / "generator.pt", weights_only=True)
    assert resumed["step"] == 3 and resumed["init"] == first["init"]
    assert {float(s["step"]) for s in resumed["optimizer"]["state"].values()} == {3.0}
    # ... and the fine-tuned run samples.
    run("sample", "--generator", out, "--out", tmp_path / "samples", "--num", "2", "--steps", "2", "--device", "cpu")
    assert len(list((tmp_path / "samples" / "samples").glob("*.png"))) == 2


def test_overwrite_refuses_a_source_inside_out_before_deleting_it(pipeline, image_folder, tmp_path, capsys):
    # A fine-tuned run restarted from its own folder (or a checkpoint in it) with --overwrite: the clearing
    # would delete the weights it starts from (it did, then failed reading them). Refused, nothing deleted.
    out = tmp_path / "ft"
    base = ["train", "--tokens", pipeline / "tokens", "--preset", "tiny", "--set", "batch_size=4", "--set",
            "sample_every=100", "--set", "save_every=1", "--device", "cpu"]
    run(*base, "--out", out, "--set", "steps=2", "--init-from", pipeline / "gen")
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    for source in (out, out / "checkpoints" / "step_0000001.pt"):
        err = fails(capsys, *base, "--out", out, "--set", "steps=3", "--init-from", source, "--overwrite")
        assert f"--init-from {source} lies in --out {out}" in err
        assert sorted(p.name for p in out.rglob("*") if p.is_file()) == files
    assert torch.load(out / "generator.pt", weights_only=True)["step"] == 2
    tok = tmp_path / "tok"
    run("train-vqgan", "--data", image_folder, "--out", tok, *SET_TINY_VQ, "--set", "steps=1", "--device", "cpu")
    err = fails(capsys, "train-vqgan", "--data", image_folder, "--out", tok, *SET_TINY_VQ, "--set", "steps=2",
                "--init-from", tok, "--overwrite", "--device", "cpu")
    assert "lies in --out" in err and (tok / "tokenizer.pt").is_file()


def test_cli_mismatched_token_folder_is_one_line(source, tmp_path, capsys):
    (tmp_path / "tokens").mkdir()
    write_random_tokens(tmp_path / "tokens", 16, 3)
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    (tmp_path / "tokens" / "meta.json").write_text(json.dumps({**meta, "codebook_size": 128}))
    err = fails(capsys, "train", "--tokens", tmp_path / "tokens", "--out", tmp_path / "ft", "--preset", "tiny",
                "--init-from", source, "--device", "cpu")
    assert "codebook_size 64" in err and "128" in err and "keeps the architecture" in err


def test_tokenizer_fine_tune_keeps_its_discriminator(pipeline, image_folder, tmp_path):
    out = tmp_path / "ft"
    run("train-vqgan", "--data", image_folder, "--out", out, *SET_TINY_VQ, "--set", "steps=2",
        "--init-from", pipeline / "tok", "--device", "cpu")
    src, ckpt = load_checkpoint(pipeline / "tok", "tokenizer"), torch.load(out / "tokenizer.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["init"]["sha256"] == _sha256(pipeline / "tok" / "tokenizer.pt")
    assert not torch.equal(src["model"]["decoder.conv_out.weight"], ckpt["model"]["decoder.conv_out.weight"])
    # Before any step: model, EMA and discriminator are the source's.
    cfg = VQGAN_TRAIN_PRESETS["tiny"]
    model, disc = VQGAN(VQ["tiny"]), PatchDiscriminator(3, cfg.disc_filters, cfg.disc_layers)
    ema = VQGAN(VQ["tiny"]).requires_grad_(False)
    start_from(pipeline / "tok", "tokenizer", VQ["tiny"], {"model": model, "disc": disc}, ema, {}, tmp_path, ONE)
    for module, key in ((model, "model"), (ema, "ema"), (disc, "disc")):
        assert all(torch.equal(v, src[key][k]) for k, v in module.state_dict().items())


def test_train_vqgan_python_api_refuses_another_architecture(pipeline, image_folder, tmp_path):
    from sundae.data import open_images
    data = open_images(image_folder, 32, 3, "train")
    with pytest.raises(ValueError, match="ch is 16 there, 32 here"):
        train_vqgan(dataclasses.replace(VQ["tiny"], ch=32), VQGAN_TRAIN_PRESETS["tiny"], data, tmp_path / "ft",
                    progress=False, init_from=pipeline / "tok")


def test_the_fine_tuning_page_commands_run(pipeline, image_folder, tmp_path, monkeypatch, capsys):
    """docs/fine-tuning.md's commands, on a quickstart-like folder made of the tiny runs: as written, with 2
    training steps of batch 4 appended (a later --set wins) and the tiny image folder for Fashion-MNIST."""
    import shlex
    import shutil
    from pathlib import Path

    quickstart = tmp_path / "quickstart"
    shutil.copytree(pipeline / "gen", quickstart / "generator")
    (quickstart / "tokenizer").symlink_to(pipeline / "tok")
    (quickstart / "tokens").symlink_to(pipeline / "tokens")
    monkeypatch.chdir(tmp_path)
    page = (Path(__file__).resolve().parents[1] / "docs" / "fine-tuning.md").read_text()
    lines = [line for block in page.split("```bash\n")[1:] for line in block.split("```")[0].splitlines()]
    ran = 0
    for line in lines:
        args = shlex.split(line.replace("/usr/share/datasets/fashion-mnist", str(image_folder)))
        if args[0] != "sundae":
            continue  # tensorboard --logdir ...
        if args[1] in ("train", "train-vqgan"):
            args += ["--set", "steps=2", "--set", "batch_size=4", "--device", "cpu"]
        run(*args[1:])
        ran += 1
    assert ran == 5
    init = torch.load("runs/finetuned/generator.pt", weights_only=True)["init"]
    assert init["path"] == str((quickstart / "generator" / "generator.pt").resolve())
    assert list(Path("runs/watched/tensorboard").glob("events.out.tfevents.*"))
    assert Path("quickstart/generator/curves.png").is_file() and Path("finetuned-samples/grid.png").is_file()
