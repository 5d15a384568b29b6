import dataclasses

import pytest
import torch

from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Hourglass
from sundae.optim import MUON_MODULES, generator_optimizers
from sundae.tokens import TokenDataset
from sundae.train import GENERATOR_TRAIN_PRESETS, lr_factor, train_generator
from sundae.train_config import GeneratorTrainConfig

MUON = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], optimizer="muon")


def _ids(opt):
    return [id(p) for group in opt.param_groups for p in group["params"]]


def test_muon_takes_the_hidden_matrices_and_adamw_everything_else():
    net = Hourglass(dataclasses.replace(HG["tiny"], num_classes=10))
    names = {id(p): n for n, p in net.named_parameters()}
    opts = generator_optimizers(net, MUON, {})
    muon, adamw = _ids(opts["optimizer_muon"]), _ids(opts["optimizer"])
    assert sorted(muon + adamw) == sorted(names) and not set(muon) & set(adamw)  # each parameter exactly once
    assert all(names[i].startswith(MUON_MODULES) and net.get_parameter(names[i]).ndim == 2 for i in muon)
    for block in ("pre.0", "valley.0", "post.0", "down_resample", "up_resample"):
        assert any(names[i].startswith(block + ".") for i in muon), block
    adamw_names = {names[i] for i in adamw}
    assert {"token_embedding.weight", "to_logits.weight", "to_logits.bias", "norm.weight"} <= adamw_names
    assert not any(names[i].startswith(MUON_MODULES) and net.get_parameter(names[i]).ndim == 2 for i in adamw)
    assert opts["optimizer_muon"].param_groups[0]["lr"] == MUON.lr
    # "adamw" (the default): one optimizer over everything.
    only = generator_optimizers(net, GENERATOR_TRAIN_PRESETS["tiny"], {})
    assert list(only) == ["optimizer"] and sorted(_ids(only["optimizer"])) == sorted(names)


def test_a_muon_step_is_orthogonalised_and_scaled_to_adamw():
    # One step from zero momentum and no weight decay: each hidden matrix moves by lr * 0.2 * sqrt(max(A, B))
    # times the Newton-Schulz orthogonalisation of its gradient, whose singular values lie near 1 (0.6-1.2
    # for these coefficients), whatever the gradient's own spread.
    torch.manual_seed(0)
    net = Hourglass(dataclasses.replace(HG["tiny"], num_classes=10))
    cfg = dataclasses.replace(MUON, lr=1e-3, weight_decay=0.0)
    opts = generator_optimizers(net, cfg, {})
    tokens = torch.randint(0, HG["tiny"].codebook_size, (4, 4, 4))
    logits = net(tokens, torch.arange(4))
    torch.nn.functional.cross_entropy(logits.flatten(0, -2), tokens.flatten()).backward()
    p = net.get_parameter("valley.0.mlp.0.weight")  # 128 x 32
    before, grad = p.detach().clone(), p.grad.clone()
    opts["optimizer_muon"].step()
    update = (before - p.detach()) / (cfg.lr * 0.2 * max(p.shape) ** 0.5)
    s, g = torch.linalg.svdvals(update), torch.linalg.svdvals(grad)  # both descending, same singular vectors
    strong = g > 0.1 * g[0]  # directions with a tenth of the top singular value or more
    assert strong.sum() >= 8 and g[strong].max() / g[strong].min() > 5, g  # the gradient is far from flat ...
    assert 0.6 < s[strong].min() and s[strong].max() < 1.25, s  # ... the update is not: Muon's doing


def test_muon_run_resumes_exactly_and_both_optimizers_follow_the_schedule(token_dir, tmp_path):
    ds, meta = TokenDataset(token_dir), {"grid": [4, 4]}
    cfg = dataclasses.replace(MUON, steps=6, batch_size=4, save_every=3, sample_every=100, lr_schedule="cosine",
                              warmup_steps=2)
    a = train_generator(HG["tiny"], cfg, ds, tmp_path / "a", meta, progress=False)
    train_generator(HG["tiny"], dataclasses.replace(cfg, steps=3), ds, tmp_path / "b", meta, progress=False)
    train_generator(HG["tiny"], dataclasses.replace(cfg, optimizer="adamw", steps=3), ds, tmp_path / "c", meta,
                    progress=False)
    with pytest.raises(ValueError, match="trained with optimizer 'adamw', this run asks for 'muon'"):
        train_generator(HG["tiny"], cfg, ds, tmp_path / "c", meta, resume=True, progress=False)
    b = train_generator(HG["tiny"], cfg, ds, tmp_path / "b", meta, resume=True, progress=False)
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa["step"] == sb["step"] == 6 and sa["train"]["optimizer"] == "muon"
    for key in sa["model"]:
        torch.testing.assert_close(sa["model"][key], sb["model"][key], rtol=0, atol=0)
        torch.testing.assert_close(sa["ema"][key], sb["ema"][key], rtol=0, atol=0)
    # Both optimizers' lr follows the schedule: at step 3 of 6 (warm-up 2) the cosine's value, at step 6 zero.
    mid = torch.load(tmp_path / "a" / "checkpoints" / "step_0000003.pt", weights_only=True)
    for ckpt, want in ((mid, cfg.lr * lr_factor(cfg, 3)), (sa, 0.0)):
        lrs = [g["lr"] for key in ("optimizer", "optimizer_muon") for g in ckpt[key]["param_groups"]]
        assert lrs == pytest.approx([want] * len(lrs), abs=1e-12)
    assert 0 < lr_factor(cfg, 3) < 1


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_an_fp16_overflow_in_one_optimizers_weights_skips_every_step(token_dir, tmp_path, monkeypatch, grad_clip):
    # One inf in the scaled gradient of a Muon matrix at step 3 (as when a token-summed weight gradient overflows):
    # neither optimizer may step (clipping would otherwise hand AdamW NaN or zeroed gradients), the scale halves,
    # and the run goes on with finite weights.
    import sundae.train as T
    real, calls, seen = T.generator_optimizers, {"n": 0}, {}

    def with_overflow(model, cfg, fused, sharded=False):
        def hook(g):
            calls["n"] += 1
            return g.clone().fill_(float("inf")) if calls["n"] == 3 else g
        model.get_parameter("pre.0.mlp.0.weight").register_hook(hook)
        opts = real(model, cfg, fused, sharded)
        for key, opt in opts.items():  # the weights each optimizer holds, after every step
            opt.register_step_post_hook(lambda o, a, k, key=key: seen.setdefault(key, []).append(calls["n"]))
        return opts
    monkeypatch.setattr(T, "generator_optimizers", with_overflow)
    cfg = dataclasses.replace(MUON, steps=5, batch_size=4, precision="fp16", grad_clip=grad_clip, log_every=1,
                              save_every=5, sample_every=100)
    path = train_generator(HG["tiny"], cfg, TokenDataset(token_dir), tmp_path / "g", {"grid": [4, 4]}, progress=False)
    assert seen == {"optimizer": [1, 2, 4, 5], "optimizer_muon": [1, 2, 4, 5]}  # step 3 skipped by both
    ckpt = torch.load(path, weights_only=True)
    assert all(v.isfinite().all() for v in ckpt["model"].values())
    assert ckpt["scaler"]["scale"] == 2.0**16 / 2  # halved once, at step 3


def test_resuming_with_the_other_optimizer_names_it(token_dir, tmp_path):
    ds, meta = TokenDataset(token_dir), {"grid": [4, 4]}
    cfg = dataclasses.replace(MUON, steps=2, batch_size=4, save_every=2, sample_every=100)
    train_generator(HG["tiny"], cfg, ds, tmp_path / "m", meta, progress=False)
    with pytest.raises(ValueError, match="trained with optimizer 'muon', this run asks for 'adamw': resume with "
                                         "--set optimizer=muon"):
        train_generator(HG["tiny"], dataclasses.replace(cfg, optimizer="adamw", steps=3), ds, tmp_path / "m", meta,
                        resume=True, progress=False)


def test_muon_is_refused_on_sharded_weights_and_unknown_optimizers_by_name():
    net = Hourglass(HG["tiny"])
    with pytest.raises(ValueError, match="sharding 'ddp'"):
        generator_optimizers(net, MUON, {}, sharded=True)
    assert list(generator_optimizers(net, GENERATOR_TRAIN_PRESETS["tiny"], {}, sharded=True)) == ["optimizer"]
    with pytest.raises(ValueError, match="optimizer must be one of adamw, muon, got 'sgd'"):
        GeneratorTrainConfig(optimizer="sgd")


def test_muon_on_a_torch_without_it_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ValueError, match=r"torch.optim.Muon \(PyTorch 2.9 or later\)"):
        generator_optimizers(Hourglass(HG["tiny"]), MUON, {})
