import dataclasses

import pytest
import torch

from sundae.checkpoint import config_from_dict, load_checkpoint, load_generator, load_tokenizer, save_checkpoint
from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Hourglass, HourglassConfig
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
    tokens = torch.randint(0, net.cfg.vocab_size, (2, 4, 4))
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
    wrong_cfg = dataclasses.replace(model.cfg, n_codes=32)
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
