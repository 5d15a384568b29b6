"""taming-transformers VQ-GANs, converted by `sundae convert-taming`, compute what the reference code computes.

The reference is the PyPI package taming-transformers-rom1504, installed with `--no-deps` (its declared
dependencies pytorch-lightning, omegaconf and torchvision are not needed, and torchvision pins an exact torch
version); only its torch + einops modules are imported. Its modules get random weights, GroupNorm affine parameters included (they start at 1 and
0, where swapped norms would go unnoticed), and are saved the way a taming Lightning `.ckpt` stores them.
"""

import contextlib
import hashlib
import io
import sys
import types
from argparse import Namespace

import numpy as np
import pytest
import torch
import yaml
from einops import rearrange
from PIL import Image

from sundae.checkpoint import load_tokenizer, save_checkpoint
from sundae.data import open_images
from cli_helpers import fails, run
from sundae.convert import convert_taming, read_lightning_checkpoint
from sundae.eval.metrics import psnr
from sundae.vqgan import PRESETS as VQ
from sundae.vqgan import VQGAN

try:
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.discriminator.model import NLayerDiscriminator
    from taming.modules.vqvae.quantize import VectorQuantizer2
except ImportError as err:  # a test dependency; see README "Tests"
    raise ImportError("tests/test_convert.py needs the reference code: "
                      "pip install --no-deps taming-transformers-rom1504==0.0.6") from err

# f=4, 64 codes; channel widths 32/64 (multiples of taming's 32 GroupNorm groups), a width change (so a
# 1x1 shortcut) and attention at 16x16 in both encoder and decoder besides the middle blocks.
SMALL = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
             num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
# vqgan_imagenet_f16_1024 and the FFHQ / CelebA-HQ first stages: f=16, 1024 codes of dimension 256.
F16 = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4],
           num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
# Decoded images: fp32 rounding differs between two implementations of the same function (kernel choice,
# F.silu against x * sigmoid(x), fused qkv, SDPA), and a deep decoder amplifies it. Measured max |ours - taming|
# in fp32: 3.5-4.2e-6 for SMALL; 0.7-1.1e-5 for F16 at 256x256, where the reference's own fp32 error against
# its float64 result is already 6e-6. So in fp32 F16 is held to 2e-5 against the reference's fp32 images and
# to 1e-5 against its float64 (exact) images; both layouts are held to 1e-9 in float64, which shows the
# functions are the same and the fp32 differences are rounding.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
F16_FP32_TOLERANCE = 2e-5


def taming_vqmodel(dd: dict, n_embed: int, embed_dim: int, seed: int) -> torch.nn.Module:
    """The reference's VQModel parts under the attribute names its checkpoints use, with random weights."""
    torch.manual_seed(seed)
    m = torch.nn.Module()
    m.encoder = Encoder(**dd)
    with contextlib.redirect_stdout(io.StringIO()):  # the reference Decoder prints its latent shape
        m.decoder = Decoder(**dd)
    m.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
    m.quant_conv = torch.nn.Conv2d(dd["z_channels"], embed_dim, 1)
    m.post_quant_conv = torch.nn.Conv2d(embed_dim, dd["z_channels"], 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        # A codebook shaped like a trained one: perturbed encoder outputs of other images, so that test images
        # use many different codes (the default init is a tiny ball every latent is far from).
        side = min(dd["resolution"], 128)
        lat = rearrange(m.quant_conv(m.encoder(torch.rand(2, 3, side, side) * 2 - 1)), "b d h w -> (b h w) d")
        picks = lat[torch.randint(len(lat), (n_embed,))]
        m.quantize.embedding.weight.copy_(picks + 0.1 * lat.std() * torch.randn_like(picks))
    return m.eval()


@torch.no_grad()
def reference(m: torch.nn.Module, x: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes `b h w`, images `b c H W` clamped to [-1, 1]) along taming's VQModel.encode / decode_code."""
    _, _, (_, _, idx) = m.quantize(m.quant_conv(m.encoder(x)))
    b, h, w = x.shape[0], x.shape[2] // f, x.shape[3] // f
    z_q = m.quantize.get_codebook_entry(idx, (b, h, w, m.quantize.e_dim))
    return idx.view(b, h, w), m.decoder(m.post_quant_conv(z_q)).clamp(-1, 1)


@pytest.fixture
def lightning_key(monkeypatch):
    """A class pickled under Lightning 1.x's ModelCheckpoint name: real taming `.ckpt` files key their callback
    states by that class (Lightning itself is not installed here)."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = cls
    return cls


def write_taming(folder, m, dd, n_embed, embed_dim, callback_key=None, transformer=False, **extra):
    """Write `model.ckpt` and `model.yaml` as taming does; returns their paths.

    A VQModel checkpoint also holds its training losses under `loss.` (here the reference discriminator);
    a transformer checkpoint holds the tokenizer under `first_stage_model.` next to the transformer.
    """
    vq = {"target": "taming.models.vqgan.VQModel",
          "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dd,
                     "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                    "params": {"disc_start": 250001, "disc_weight": 0.8, "codebook_weight": 1.0}}}}
    if transformer:
        state = {f"first_stage_model.{k}": v for k, v in m.state_dict().items()}
        state["transformer.tok_emb.weight"] = torch.randn(n_embed, 16)
        vq["params"]["lossconfig"] = {"target": "taming.modules.losses.DummyLoss"}
        model = {"target": "taming.models.cond_transformer.Net2NetTransformer",
                 "params": {"first_stage_config": vq, "cond_stage_config": "__is_unconditional__",
                            "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT"}}}
    else:
        disc = NLayerDiscriminator(input_nc=3, n_layers=2, ndf=16)
        state = {**m.state_dict(), **{f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()}}
        model = {"base_learning_rate": 4.5e-6, **vq}
    ckpt = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "params": [0]}]}],
            "lr_schedulers": [], **extra}
    if callback_key is not None:
        ckpt["callbacks"] = {callback_key: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.25),
                                            "best_model_path": "logs/run/checkpoints/last.ckpt"}}
    torch.save(ckpt, folder / "model.ckpt")
    (folder / "model.yaml").write_text(yaml.safe_dump({"model": model}))
    return folder / "model.ckpt", folder / "model.yaml"



def assert_parity(ours, m, x, f, tolerance=None):
    """Identical codes and images within `tolerance` (default: TOLERANCE of x's dtype) on images `x`."""
    codes, images = reference(m, x, f)
    tokens = ours.encode(x)
    assert torch.equal(tokens, codes)
    assert codes.unique().numel() > 1  # not a degenerate all-one-code image
    decoded = ours.decode(tokens)
    diff = (decoded - images).abs().max().item()
    assert diff < (tolerance or TOLERANCE[x.dtype]), diff
    return tokens, decoded


def assert_parity_in_float64(ours, m, f, size):
    """Both networks in float64 (our nearest-code search stays fp32 by design; the codes must still match)."""
    assert_parity(ours.double(), m.double(), torch.rand(2, 3, *size, dtype=torch.float64) * 2 - 1, f)


def test_small_parity_from_a_lightning_checkpoint(tmp_path, lightning_key):
    m = taming_vqmodel(SMALL, 64, 8, seed=0)
    ckpt, cfg = write_taming(tmp_path, m, SMALL, 64, 8, callback_key=lightning_key)
    ours = load_tokenizer(convert_taming(ckpt, cfg, tmp_path / "out"))
    assert ours.cfg.f == 4 and ours.cfg.codebook_size == 64
    x = torch.rand(3, 3, 32, 48) * 2 - 1  # non-square: the attention grid is not square either
    assert_parity(ours, m, x, 4)
    assert_parity_in_float64(ours, m, 4, (32, 48))


def test_parity_detects_a_wrong_mapping(tmp_path):
    """The tolerance is far below what a mistake costs: taming's q and k swapped changes the images by far more."""
    m = taming_vqmodel(SMALL, 64, 8, seed=0)
    sd = m.state_dict()
    q, k = "decoder.mid.attn_1.q.weight", "decoder.mid.attn_1.k.weight"
    sd[q], sd[k] = sd[k].clone(), sd[q].clone()
    swapped = taming_vqmodel(SMALL, 64, 8, seed=0)
    swapped.load_state_dict(sd)
    ckpt, cfg = write_taming(tmp_path, swapped, SMALL, 64, 8)
    ours = load_tokenizer(convert_taming(ckpt, cfg, tmp_path / "out"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes, images = reference(m, x, 4)
    assert (ours.decode(codes) - images).abs().max().item() > 100 * F16_FP32_TOLERANCE


def test_f16_1024_parity_at_256(tmp_path):
    """The paper's tokenizer layout (vqgan_imagenet_f16_1024, FFHQ, CelebA-HQ) on one 256x256 image."""
    m = taming_vqmodel(F16, 1024, 256, seed=1)
    ckpt, cfg = write_taming(tmp_path, m, F16, 1024, 256)
    ours = load_tokenizer(convert_taming(ckpt, cfg, tmp_path / "out"))
    assert ours.cfg.f == 16 and ours.cfg.codebook_size == 1024 and ours.cfg.resolution == 256
    tokens, decoded = assert_parity(ours, m, torch.rand(1, 3, 256, 256) * 2 - 1, 16, F16_FP32_TOLERANCE)
    assert tokens.shape == (1, 16, 16)
    m.double()
    with torch.no_grad():  # the reference's images for these codes, computed in float64
        z_q = m.quantize.get_codebook_entry(tokens.flatten(), (1, 16, 16, 256))
        exact = m.decoder(m.post_quant_conv(z_q)).clamp(-1, 1)
    assert (decoded.double() - exact).abs().max().item() < TOLERANCE[torch.float32]
    assert_parity_in_float64(ours, m, 16, (64, 64))  # smaller images: float64 on a CPU is slow


def test_first_stage_model_prefix(tmp_path):
    m = taming_vqmodel(SMALL, 64, 8, seed=2)
    ckpt, cfg = write_taming(tmp_path, m, SMALL, 64, 8, transformer=True)
    ours = load_tokenizer(convert_taming(ckpt, cfg, tmp_path / "out"))
    assert_parity(ours, m, torch.rand(2, 3, 32, 32) * 2 - 1, 4)


class RunsCode:
    """Unpickling this would create `path`: what a malicious checkpoint could do instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("payload, name", [(Namespace(lr=4.5e-6), "argparse.Namespace"),
                                           ("runs code", "io.open")])
def test_pickled_objects_are_refused(tmp_path, capsys, payload, name):
    marker = tmp_path / "code_ran"
    m = taming_vqmodel(SMALL, 64, 8, seed=0)
    hparams = RunsCode(marker) if payload == "runs code" else payload
    ckpt, cfg = write_taming(tmp_path, m, SMALL, 64, 8, hyper_parameters=hparams)
    with pytest.raises(ValueError, match="refused") as err:
        read_lightning_checkpoint(ckpt)
    assert name in str(err.value) and str(ckpt) in str(err.value)
    assert not marker.exists()
    err = fails(capsys, "convert-taming", "--checkpoint", ckpt, "--config", cfg, "--out", tmp_path / "out")
    assert name in err and not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_checkpoint_is_unreadable_not_refused(tmp_path):
    ckpt, _ = write_taming(tmp_path, taming_vqmodel(SMALL, 64, 8, seed=0), SMALL, 64, 8)
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_lightning_checkpoint(ckpt)


def test_missing_and_unexpected_keys_are_listed(tmp_path, capsys):
    m = taming_vqmodel(SMALL, 64, 8, seed=0)
    ckpt, cfg = write_taming(tmp_path, m, SMALL, 64, 8)
    data = torch.load(ckpt, weights_only=True)
    del data["state_dict"]["decoder.up.1.attn.0.v.bias"]
    data["state_dict"]["encoder.down.0.block.0.temb_proj.weight"] = torch.zeros(32, 512)
    torch.save(data, ckpt)
    err = fails(capsys, "convert-taming", "--checkpoint", ckpt, "--config", cfg, "--out", tmp_path / "out")
    assert "missing keys decoder.up.1.attn.0.v.bias" in err
    assert "unexpected keys encoder.down.0.block.0.temb_proj.weight" in err


@pytest.mark.parametrize("change, message", [
    ({"double_z": True}, "double_z must be false"),
    ({"out_ch": 1}, "in_channels 3 != out_ch 1"),
    ({"ch": 64}, "shapes do not match"),
    ({"ch": 48}, "multiples of taming's 32 GroupNorm groups"),
])
def test_config_mismatches_are_refused(tmp_path, capsys, change, message):
    m = taming_vqmodel(SMALL, 64, 8, seed=0)
    ckpt, cfg = write_taming(tmp_path, m, SMALL, 64, 8)
    doc = yaml.safe_load(cfg.read_text())
    doc["model"]["params"]["ddconfig"].update(change)
    cfg.write_text(yaml.safe_dump(doc))
    assert message in fails(capsys, "convert-taming", "--checkpoint", ckpt, "--config", cfg, "--out", tmp_path / "o")


def test_gumbel_and_missing_fields_are_refused(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, ckpt)
    cfg = tmp_path / "gumbel.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.GumbelVQ",
                                             "params": {"ddconfig": SMALL, "n_embed": 8192, "embed_dim": 256}}}))
    assert "only taming.models.vqgan.VQModel converts" in fails(
        capsys, "convert-taming", "--checkpoint", ckpt, "--config", cfg, "--out", tmp_path / "o")
    cfg.write_text(yaml.safe_dump({"model": {"params": {"ddconfig": SMALL, "embed_dim": 8}}}))
    assert "missing field 'n_embed'" in fails(
        capsys, "convert-taming", "--checkpoint", ckpt, "--config", cfg, "--out", tmp_path / "o")


def test_converted_tokenizer_through_the_cli(tmp_path, image_folder, capsys):
    """convert-taming, then tokenize, reconstruct, train, sample and inpaint take the converted tokenizer."""
    m = taming_vqmodel(SMALL, 64, 8, seed=3)
    ckpt, cfg = write_taming(tmp_path, m, SMALL, 64, 8)
    run("convert-taming", "--checkpoint", ckpt, "--config", cfg, "--out", tmp_path / "tok")
    tok = tmp_path / "tok" / "tokenizer.pt"
    assert "f=4, 64 codes, 32x32 images -> 8x8 tokens" in capsys.readouterr().out
    assert "exists" in fails(capsys, "convert-taming", "--checkpoint", ckpt, "--config", cfg, "--out", tmp_path / "tok")

    dataset = open_images(image_folder, 32, 3)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    codes, images = reference(m, x, 4)
    run("tokenize", "--tokenizer", tok, "--data", image_folder, "--out", tmp_path / "tokens", "--device", "cpu")
    assert np.array_equal(np.load(tmp_path / "tokens" / "tokens.npy"), codes.numpy())

    run("reconstruct", "--tokenizer", tok, "--data", image_folder, "--num", 4, "--out", tmp_path / "r.png",
        "--device", "cpu")
    assert f"PSNR {psnr(images[:4], x[:4]):.2f} dB" in capsys.readouterr().out

    run("train", "--tokens", tmp_path / "tokens", "--out", tmp_path / "gen", "--preset", "tiny", "--set", "steps=2",
        "--set", "batch_size=4", "--set", "sample_every=2", "--device", "cpu")
    gen = tmp_path / "gen" / "generator.pt"
    run("sample", "--generator", gen, "--out", tmp_path / "s", "--num", 2, "--steps", 3, "--class", 0,
        "--device", "cpu")
    assert len(list((tmp_path / "s" / "samples").iterdir())) == 2
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:8, :8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image = image_folder / "circles" / "00.png"
    run("inpaint", "--generator", gen, "--image", image, "--mask", tmp_path / "mask.png", "--out", tmp_path / "i",
        "--num", 2, "--class", 0, "--steps", 3, "--device", "cpu")
    completion = np.asarray(Image.open(tmp_path / "i" / "completion_00.png"))
    assert np.array_equal(completion[8:], np.asarray(Image.open(image))[8:])  # outside the masked cells: the input


def test_folders_and_sundae_checkpoints_are_named(tmp_path, capsys):
    ckpt, cfg = write_taming(tmp_path, taming_vqmodel(SMALL, 64, 8, seed=0), SMALL, 64, 8)
    out = tmp_path / "out"
    err = fails(capsys, "convert-taming", "--checkpoint", ckpt, "--config", tmp_path, "--out", out)
    assert err.endswith(f"error: config {tmp_path} is a folder, expected a taming YAML file: did you mean {cfg}?")
    err = fails(capsys, "convert-taming", "--checkpoint", tmp_path, "--config", cfg, "--out", out)
    assert err.endswith(f"error: checkpoint {tmp_path} is a folder, expected a taming checkpoint file: "
                        f"did you mean {ckpt}?")
    (tmp_path / "empty").mkdir()
    err = fails(capsys, "convert-taming", "--checkpoint", ckpt, "--config", tmp_path / "empty", "--out", out)
    assert err.endswith(f"config {tmp_path / 'empty'} is a folder, expected a taming YAML file")
    # Our own tokenizer checkpoint (a dict with "format" and "kind"): use it directly, whatever the config.
    tok = tmp_path / "tokenizer.pt"
    torch.manual_seed(0)
    model = VQGAN(VQ["tiny"])
    save_checkpoint(tok, "tokenizer", model.cfg, model, ema=None)
    (tmp_path / "other.yaml").write_text("model: {}\n")  # not a taming config either
    for config in (cfg, tmp_path / "other.yaml"):
        err = fails(capsys, "convert-taming", "--checkpoint", tok, "--config", config, "--out", out)
        assert err.endswith(f"error: {tok} is already a sundae tokenizer checkpoint: use it directly "
                            f"(--tokenizer {tok}); convert-taming reads taming-transformers checkpoints")
    save_checkpoint(tok, "generator", model.cfg, {})
    with pytest.raises(ValueError, match=r"tokenizer.pt is a sundae generator checkpoint, not a taming"):
        read_lightning_checkpoint(tok)
    assert not out.exists()


@pytest.mark.parametrize("payload, name", [(Namespace(lr=4.5e-6), "argparse.Namespace"),
                                           ("runs code", "io.open")])
def test_every_loader_names_what_it_refused_and_never_suggests_the_unsafe_load(tmp_path, capsys, payload, name):
    from sundae.checkpoint import load_checkpoint
    from sundae.losses import _load_tensors
    marker = tmp_path / "code_ran"
    path = tmp_path / "hostile.pt"
    torch.save({"format": 1, "kind": "generator", "x": RunsCode(marker) if payload == "runs code" else payload},
               path)
    for load in (lambda: load_checkpoint(path, "generator"), lambda: _load_tensors(path, "VGG16 weights")):
        with pytest.raises(ValueError, match="refused") as err:
            load()
        message = str(err.value)
        assert name in message and str(path) in message and "weights_only" not in message, message
    for verb in (["sample", "--generator", path, "--out", tmp_path / "s"], ["export", path, tmp_path / "e"]):
        err = fails(capsys, *verb)
        assert name in err and "truncated" not in err and "weights_only" not in err, err
    assert not marker.exists()


def test_fine_tuning_a_converted_tokenizer_gives_it_a_fresh_discriminator(tmp_path, image_folder):
    from sundae.distributed import Dist
    from sundae.losses import PatchDiscriminator
    from sundae.runs import start_from

    m = taming_vqmodel(SMALL, 64, 8, seed=4)
    converted = convert_taming(*write_taming(tmp_path, m, SMALL, 64, 8), tmp_path / "conv")
    source = torch.load(converted, weights_only=True)
    assert "disc" not in source and "ema" not in source
    # Before any step: the model and the EMA are the converted weights, the discriminator its own fresh one.
    ours, ema = VQGAN(load_tokenizer(converted).cfg), VQGAN(load_tokenizer(converted).cfg).requires_grad_(False)
    disc = PatchDiscriminator(3, 8, 3)
    fresh = {k: v.clone() for k, v in disc.state_dict().items()}
    start_from(tmp_path / "conv", "tokenizer", ours.cfg, {"model": ours, "disc": disc}, ema, {}, tmp_path, Dist())
    for module in (ours, ema):
        assert all(torch.equal(v, source["model"][k]) for k, v in module.state_dict().items())
    assert all(torch.equal(v, fresh[k]) for k, v in disc.state_dict().items())
    # Through the command line: 2 steps with the GAN on from the start.
    run("train-vqgan", "--data", image_folder, "--out", tmp_path / "ft", "--preset", "tiny", "--set", "steps=2",
        "--set", "batch_size=4", "--set", "disc_start=0", "--init-from", converted, "--device", "cpu")
    tuned = torch.load(tmp_path / "ft" / "tokenizer.pt", weights_only=True)
    assert tuned["step"] == 2 and tuned["config"] == source["config"]
    assert tuned["init"]["sha256"] == hashlib.sha256(converted.read_bytes()).hexdigest()
    assert not torch.equal(tuned["model"]["decoder.conv_out.weight"], source["model"]["decoder.conv_out.weight"])
