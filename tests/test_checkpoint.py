import dataclasses
import re

import pytest
import torch

from sundae.checkpoint import (config_from_dict, export, load_checkpoint, load_generator, load_tokenizer,
                               save_checkpoint)
from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Hourglass, HourglassConfig
from sundae.sundae import sample
from sundae.vqgan import PRESETS as VQ
from sundae.vqgan import VQGAN


def test_save_load_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    net = Hourglass(HG["tiny"]).eval()
    path = tmp_path / "g.pt"
    save_checkpoint(path, "generator", net.cfg, net, meta={"grid": [4, 4]})
    # Plain data: loads with weights_only=True.
    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == "generator" and raw["config"]["depth"] == (1, 1, 1)
    loaded, meta = load_generator(path)
    tokens = torch.randint(0, net.cfg.codebook_size, (2, 4, 4))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(net(tokens, labels), loaded(tokens, labels))
    assert meta == {"grid": [4, 4]} and loaded.cfg == net.cfg


def test_ema_weights_are_loaded_by_default(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(VQ["tiny"])
    ema = VQGAN(VQ["tiny"]).state_dict()
    path = tmp_path / "t.pt"
    save_checkpoint(path, "tokenizer", model.cfg, model, ema=ema)
    assert torch.equal(load_tokenizer(path).decoder.conv_out.weight, ema["decoder.conv_out.weight"])
    assert torch.equal(load_tokenizer(path, ema=False).decoder.conv_out.weight, model.decoder.conv_out.weight)


def test_wrong_kind_truncated_and_mismatched(tmp_path):
    model = VQGAN(VQ["tiny"])
    path = tmp_path / "t.pt"
    save_checkpoint(path, "tokenizer", model.cfg, model)
    with pytest.raises(ValueError, match="holds a tokenizer, but a generator was expected"):
        load_generator(path)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.pt"):
        load_tokenizer(truncated)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", "tokenizer")
    other = tmp_path / "other.pt"
    wrong_cfg = dataclasses.replace(model.cfg, codebook_size=32)
    save_checkpoint(other, "tokenizer", wrong_cfg, model)
    with pytest.raises(ValueError, match="do not match"):
        load_tokenizer(other)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    net = Hourglass(HG["tiny"])
    save_checkpoint(tmp_path / "g.pt", "generator", net.cfg, net)
    save_checkpoint(tmp_path / "g.pt", "generator", net.cfg, net)
    assert [p.name for p in tmp_path.iterdir()] == ["g.pt"]


def test_config_from_dict_rejects_unknown_keys():
    cfg = config_from_dict(HourglassConfig, {"dim": 64, "depth": [1, 2, 1]})
    assert cfg.depth == (1, 2, 1)
    with pytest.raises(ValueError, match="widht"):
        config_from_dict(HourglassConfig, {"widht": 3})


def test_configs_stored_under_the_old_names_load(tmp_path):
    """Checkpoints and exports written before the codebook size had one name store it as `vocab_size`
    (generator) and `n_codes` (tokenizer, and the generator's meta): they load and sample as before."""
    torch.manual_seed(0)
    net, tok = Hourglass(HG["tiny"]).eval(), VQGAN(VQ["tiny"]).eval()
    for model, old_key, kind in ((net, "vocab_size", "generator"), (tok, "n_codes", "tokenizer")):
        config = {(old_key if k == "codebook_size" else k): v for k, v in dataclasses.asdict(model.cfg).items()}
        torch.save({"format": "sundae", "version": 1, "kind": kind, "config": config, "model": model.state_dict(),
                    "meta": {"grid": [4, 4], "n_codes": 64}}, tmp_path / f"{kind}.pt")
        export(tmp_path / f"{kind}.pt", tmp_path / f"{kind}_export")
        both = tmp_path / f"both_{kind}.pt"
        torch.save({"format": "sundae", "version": 1, "kind": kind, "config": {**config, "codebook_size": 64},
                    "model": model.state_dict()}, both)
        with pytest.raises(ValueError, match=re.escape(f"{both}: ") + f".* both 'codebook_size' and its old name "
                                             f"'{old_key}'"):
            (load_generator if kind == "generator" else load_tokenizer)(both)
    for source in (tmp_path / "tokenizer.pt", tmp_path / "tokenizer_export"):
        assert load_tokenizer(source).cfg == tok.cfg
    labels = torch.tensor([1, 2])
    for source in (tmp_path / "generator.pt", tmp_path / "generator_export"):
        loaded, meta = load_generator(source)
        assert loaded.cfg == net.cfg and meta == {"grid": [4, 4], "n_codes": 64}
        runs = [sample(lambda z, rows, step: m(z, labels[rows]), (2, 4, 4), m.cfg.codebook_size, steps=4,
                       generator=torch.Generator().manual_seed(0))[0] for m in (net, loaded)]
        assert torch.equal(runs[0], runs[1])


def test_non_finite_weights_are_refused_when_loading(tmp_path):
    torch.manual_seed(0)
    model = Hourglass(HG["tiny"])
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ema["to_logits.weight"][0, 0] = float("nan")
    path = tmp_path / "g.pt"
    save_checkpoint(path, "generator", model.cfg, model, ema=ema)
    with pytest.raises(ValueError, match=r"g\.pt: the EMA weights hold NaN or infinite values \(to_logits.weight\)"):
        load_generator(path)
    assert load_generator(path, ema=False)[0].to_logits.weight.isfinite().all()  # the raw weights are fine
    out = export(path, tmp_path / "export", ema=False)
    state = torch.load(path, weights_only=True)
    state["model"]["to_logits.bias"][:] = float("inf")
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"the weights hold NaN or infinite values \(to_logits.bias\)"):
        load_generator(path, ema=False)
    assert load_generator(out)[0] is not None  # the export made before the damage still loads
