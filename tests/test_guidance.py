"""Classifier-free guidance (Ho & Salimans 2022): condition dropout in training, the guided logits function."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from sundae.pipeline import class_logits_fn
from sundae.hourglass import Hourglass
from sundae.hourglass import PRESETS as HG
from sundae.sundae import condition_dropout, guidance_scales, guided_logits_fn, sample
from sundae.tokens import TokenDataset
from sundae.train import GENERATOR_TRAIN_PRESETS, train_generator


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Hourglass(HG["tiny"]).eval()
    with torch.no_grad():  # an init-sized class embedding barely moves the logits: make conditions matter
        model.class_embedding.embedding.weight.normal_(0, 1.0)
    return model


def test_scale_one_is_conditional_and_zero_is_unconditional(net):
    z = torch.randint(0, 64, (3, 4, 4), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 4, 7, 9])
    rows = torch.tensor([0, 2, 3])  # the sampler passes the rows still in the batch
    with torch.no_grad():
        cond = net(z, labels[rows])
        uncond = net(z)  # no labels: the null class
        one = guided_logits_fn(lambda x, r, d: net(x, labels[r], drop=d), 1.0)(z, rows, 0)
        zero = guided_logits_fn(lambda x, r, d: net(x, labels[r], drop=d), 0.0)(z, rows, 0)
        three = class_logits_fn(net, labels, guidance_scale=3.0)(z, rows, 0)
    assert (cond - uncond).abs().max() > 1e-2  # the condition changes the logits, so the checks below can fail
    torch.testing.assert_close(one, cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(zero, uncond, atol=1e-5, rtol=0)
    torch.testing.assert_close(three, uncond + 3 * (cond - uncond), atol=1e-4, rtol=0)


def test_schedule_moves_linearly_over_the_steps(net):
    assert guidance_scales((1.0, 3.0), 5) == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert guidance_scales(2.0, 3) == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="^guidance scale nan: expected finite numbers$"):
        guidance_scales(float("nan"), 3)
    with pytest.raises(ValueError, match=r"^guidance scale 1.0,1e\+300: too large for the float32 logits"):
        guidance_scales((1.0, 1e300), 3)  # finite in Python, an overflow in the logits
    with pytest.raises(ValueError, match="^--guidance-scale 1,inf: expected finite numbers$"):
        guidance_scales((1.0, float("inf")), 3, "--guidance-scale 1,inf")  # how the CLI names it
    seen = []

    def conditioned(x, r, d):  # cond rows give 1, null rows 0: the guided logits are the scale itself
        seen.append(len(x))
        return (~d).float()[:, None, None, None].expand(len(x), 1, 1, 2)
    fn = guided_logits_fn(conditioned, (0.0, 2.0), steps=3)
    z, rows = torch.zeros(2, 1, 1, dtype=torch.long), torch.arange(2)
    assert [fn(z, rows, n)[0, 0, 0, 0].item() for n in range(4)] == [0.0, 1.0, 2.0, 2.0]  # past the end: last
    assert seen == [4, 4, 4, 4]  # one forward per step, cond and null rows together


def test_guided_sampling_is_seeded_and_runs_the_sampler(net):
    labels = torch.tensor([1, 2, 3, 4])
    runs = [sample(class_logits_fn(net, labels, guidance_scale=(1.0, 4.0), steps=6), (4, 4, 4), 64, steps=6,
                   min_steps=6, generator=torch.Generator().manual_seed(0))[0] for _ in range(2)]
    plain = sample(class_logits_fn(net, labels), (4, 4, 4), 64, steps=6, min_steps=6,
                   generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], plain)


def test_guidance_on_an_unconditional_model_is_an_error():
    uncond = Hourglass(dataclasses.replace(HG["tiny"], num_classes=0))
    with pytest.raises(ValueError, match="unconditional"):
        class_logits_fn(uncond, None, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(torch.zeros(1, 4, 4, dtype=torch.long), drop=torch.tensor([True]))
    class_logits_fn(uncond, None, guidance_scale=1.0)  # no guidance: fine


def test_condition_dropout_is_per_sample():
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    whole = condition_dropout(6, 0.5, "cpu", gens)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    split = torch.cat([condition_dropout(2, 0.5, "cpu", gens[:2]), condition_dropout(4, 0.5, "cpu", gens[2:])])
    assert torch.equal(whole, split)
    many = condition_dropout(20_000, 0.1, "cpu", torch.Generator().manual_seed(0)).float().mean().item()
    assert abs(many - 0.1) < 4 * (0.1 * 0.9 / 20_000) ** 0.5  # binomial, 4 standard deviations
    assert condition_dropout(5, 1.0, "cpu").all() and not condition_dropout(5, 0.0, "cpu").any()
    with pytest.raises(ValueError, match="dropout"):
        condition_dropout(5, 1.5, "cpu")


def _tokens(root, labels):
    root.mkdir()
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 64, (16, 4, 4)).astype(np.uint16))
    np.save(root / "labels.npy", np.asarray(labels, dtype=np.int64))
    (root / "meta.json").write_text(json.dumps({"grid": [4, 4], "codebook_size": 64, "num_classes": 10}))
    return TokenDataset(root)


def test_dropout_one_never_sees_the_labels(tmp_path):
    """With cond_dropout 1.0 every sample trains with the null class, so (a) the weights cannot depend on
    the labels: two datasets that differ only in their labels give bitwise the same run, and (b) the
    embeddings of the real classes never get a gradient and keep their initial values, while the null
    class's embedding trains. With dropout 0 the labels do change the run (the check can fail)."""
    cfg = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=4, batch_size=4, save_every=100,
                              sample_every=100, cond_dropout=1.0)
    a_data, b_data = _tokens(tmp_path / "a", [0] * 8 + [1] * 8), _tokens(tmp_path / "b", list(range(10)) + [9] * 6)
    meta = {"grid": [4, 4]}
    run = {}
    no_dropout = dataclasses.replace(cfg, steps=1, cond_dropout=0.0)
    for name, data, c in (("a", a_data, cfg), ("b", b_data, cfg), ("a0", a_data, no_dropout),
                          ("b0", b_data, no_dropout)):
        run[name] = torch.load(train_generator(HG["tiny"], c, data, tmp_path / f"run_{name}", meta, progress=False),
                               weights_only=True)["model"]
    torch.manual_seed(cfg.seed)  # train_generator builds the model right after seeding: its initial weights
    run["init"] = Hourglass(HG["tiny"]).state_dict()
    for key in run["a"]:
        assert torch.equal(run["a"][key], run["b"][key]), key
    emb = "class_embedding.embedding.weight"
    assert torch.equal(run["a"][emb][:10], run["init"][emb][:10])
    assert not torch.equal(run["a"][emb][10], run["init"][emb][10])  # the null class did train
    assert not torch.equal(run["a0"]["token_embedding.weight"], run["b0"]["token_embedding.weight"])
