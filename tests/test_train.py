import dataclasses
import gzip
import json

import numpy as np
import pytest
import torch

from sundae.data import IdxImages, ImageFolder
from sundae.hourglass import PRESETS as HG
from sundae.images import make_grid
from sundae.tokens import TokenDataset
from sundae.train import (GENERATOR_TRAIN_PRESETS, VQGAN_TRAIN_PRESETS, EpochBatchSampler, lr_factor,
                          train_generator, train_vqgan)
from sundae.vqgan import PRESETS as VQ


def test_epoch_batch_sampler_resumes_at_the_same_batch():
    full = EpochBatchSampler(10, 3, seed=1)
    it = iter(full)
    batches = [next(it) for _ in range(7)]  # 3 batches an epoch: crosses two epoch boundaries
    assert all(len(b) == 3 for b in batches)
    assert len(set(sum(batches[:3], []))) == 9  # no repeats within an epoch
    resumed = iter(EpochBatchSampler(10, 3, seed=1, start_step=4))
    assert [next(resumed) for _ in range(3)] == batches[4:7]
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatchSampler(2, 3, seed=0)


def test_ranks_split_the_same_global_batches():
    # 11 items, global batch 4 over 2 ranks: rank r gets half r of every 1-process batch, also after a resume.
    one = iter(EpochBatchSampler(11, 4, seed=2))
    batches = [next(one) for _ in range(6)]
    for start in (0, 4):
        ranks = [iter(EpochBatchSampler(11, 4, seed=2, start_step=start, rank=r, world=2)) for r in (0, 1)]
        for batch in batches[start:]:
            assert next(ranks[0]) + next(ranks[1]) == batch
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        EpochBatchSampler(11, 4, seed=0, world=3)


def test_generator_resume_matches_uninterrupted_run(token_dir, tmp_path):
    ds = TokenDataset(token_dir)
    cfg = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=6, batch_size=4, save_every=3, sample_every=100)
    meta = {"grid": [4, 4]}
    a = train_generator(HG["tiny"], cfg, ds, tmp_path / "a", meta, progress=False)
    # Interrupted after 3 steps, then resumed to 6.
    train_generator(HG["tiny"], dataclasses.replace(cfg, steps=3), ds, tmp_path / "b", meta, progress=False)
    b = train_generator(HG["tiny"], cfg, ds, tmp_path / "b", meta, resume=True, progress=False)
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa["step"] == sb["step"] == 6
    for key in sa["model"]:
        torch.testing.assert_close(sa["model"][key], sb["model"][key], rtol=0, atol=0)
    for key in sa["ema"]:
        torch.testing.assert_close(sa["ema"][key], sb["ema"][key], rtol=0, atol=0)


def test_vqgan_resume_matches_uninterrupted_run(image_folder, tmp_path):
    ds = ImageFolder(image_folder, 32, 3)
    cfg = dataclasses.replace(VQGAN_TRAIN_PRESETS["tiny"], steps=4, batch_size=4, disc_start=1, save_every=2,
                              restart_dead_codes=2)
    a = train_vqgan(VQ["tiny"], cfg, ds, tmp_path / "a", progress=False)
    train_vqgan(VQ["tiny"], dataclasses.replace(cfg, steps=2), ds, tmp_path / "b", progress=False)
    b = train_vqgan(VQ["tiny"], cfg, ds, tmp_path / "b", resume=True, progress=False)
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for part in ("model", "disc"):
        for key in sa[part]:
            torch.testing.assert_close(sa[part][key], sb[part][key], rtol=0, atol=0)


def test_non_finite_loss_stops_with_the_step(token_dir, tmp_path):
    ds = TokenDataset(token_dir)
    def diverging(steps):  # the config refuses lr=inf; set behind its back to force a divergence
        cfg = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=steps, batch_size=4)
        object.__setattr__(cfg, "lr", float("inf"))
        return cfg
    cfg = diverging(3)
    # With an infinite lr the run stops at its first step.
    with pytest.raises(FloatingPointError, match="at step 1; .* the run has no checkpoint yet"):
        train_generator(HG["tiny"], cfg, ds, tmp_path / "x", {"grid": [4, 4]}, progress=False)
    assert not (tmp_path / "x" / "generator.pt").exists()
    # A run with a checkpoint keeps it, and the message says --resume continues from it.
    good = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=2, batch_size=4)
    saved = train_generator(HG["tiny"], good, ds, tmp_path / "y", {"grid": [4, 4]}, progress=False)
    before = saved.read_bytes()
    with pytest.raises(FloatingPointError, match="at step 3; .* the last good checkpoint is kept"):
        train_generator(HG["tiny"], diverging(5), ds, tmp_path / "y", {"grid": [4, 4]},
                        resume=True, progress=False)
    assert saved.read_bytes() == before


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_images_pad_and_scale(tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = 255
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([4, 0, 9]))
    ds = IdxImages(tmp_path, "train", 32)
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and y == 4
    assert x[0, 2, 2].item() == 1.0 and x[0, 0, 0].item() == -1.0 and x.min().item() == -1.0
    assert ds.num_classes == 10
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 8)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        IdxImages(tmp_path, "test", 32)


def test_make_grid_places_images():
    imgs = torch.stack([torch.full((1, 2, 2), float(i)) for i in range(3)])
    grid = make_grid(imgs, nrow=2, pad=1, value=-1.0)
    assert grid.shape == (1, 1 + 2 * 3, 1 + 2 * 3)
    assert grid[0, 1, 1] == 0 and grid[0, 1, 4] == 1 and grid[0, 4, 1] == 2 and grid[0, 4, 4] == -1


def test_fp16_training_resumes_with_its_gradient_scaler(token_dir, tmp_path):
    ds, meta = TokenDataset(token_dir), {"grid": [4, 4]}
    cfg = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=6, batch_size=4, save_every=3, precision="fp16")
    a = train_generator(HG["tiny"], cfg, ds, tmp_path / "a", meta, progress=False)
    train_generator(HG["tiny"], dataclasses.replace(cfg, steps=3), ds, tmp_path / "b", meta, progress=False)
    b = train_generator(HG["tiny"], cfg, ds, tmp_path / "b", meta, resume=True, progress=False)
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    # The scaler counted 6 good steps in both (3 of them before the resume), at the initial scale 2^16.
    assert sa["scaler"]["_growth_tracker"] == sb["scaler"]["_growth_tracker"] == 6
    assert sa["scaler"]["scale"] == sb["scaler"]["scale"] == 2.0 ** 16
    for key in sa["model"]:
        torch.testing.assert_close(sa["model"][key], sb["model"][key], rtol=0, atol=0)


def test_fp16_resume_from_an_unfused_checkpoint_trains_fused(token_dir, tmp_path, monkeypatch, image_folder):
    """Checkpoints saved before the optimizers were fused resume: the saved groups' `fused` (None) must not
    leave an optimizer that GradScaler treats as fused (the unfused update then rejects grad_scale)."""
    import sundae.train as T
    ds, meta = TokenDataset(token_dir), {"grid": [4, 4]}
    cfg = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=3, batch_size=4, save_every=3, precision="fp16")
    real = T.fused_optimizer
    monkeypatch.setattr(T, "fused_optimizer", lambda *a, **k: {})
    train_generator(HG["tiny"], cfg, ds, tmp_path / "g", meta, progress=False)
    vcfg = dataclasses.replace(VQGAN_TRAIN_PRESETS["tiny"], steps=3, batch_size=4, disc_start=1, save_every=3,
                               precision="fp16")
    images = ImageFolder(image_folder, 32, 3)
    train_vqgan(VQ["tiny"], vcfg, images, tmp_path / "t", progress=False)
    for path in (tmp_path / "g" / "generator.pt", tmp_path / "t" / "tokenizer.pt"):
        assert torch.load(path, weights_only=True)["optimizer"]["param_groups"][0]["fused"] is None
    monkeypatch.setattr(T, "fused_optimizer", real)
    out = train_generator(HG["tiny"], dataclasses.replace(cfg, steps=6), ds, tmp_path / "g", meta, resume=True,
                          progress=False)
    tok = train_vqgan(VQ["tiny"], dataclasses.replace(vcfg, steps=6), images, tmp_path / "t", resume=True,
                      progress=False)
    for path, key in ((out, "optimizer"), (tok, "optimizer"), (tok, "optimizer_disc")):
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["step"] == 6 and ckpt[key]["param_groups"][0]["fused"] is True
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_token_folder_with_the_old_codebook_key(token_dir):
    """Token folders written before the codebook size had one name say "n_codes" in meta.json: they load."""
    (token_dir / "meta.json").write_text(json.dumps({"grid": [4, 4], "n_codes": 64, "num_classes": 10}))
    ds = TokenDataset(token_dir)
    assert ds.meta["codebook_size"] == 64 and "n_codes" not in ds.meta and len(ds) == 20 and ds.num_classes == 10
    (token_dir / "meta.json").write_text(json.dumps({"grid": [4, 4], "n_codes": 8}))
    with pytest.raises(ValueError, match="but meta.json says codebook_size=8"):
        TokenDataset(token_dir)
    (token_dir / "meta.json").write_text(json.dumps({"grid": [4, 4], "n_codes": 64, "codebook_size": 64}))
    with pytest.raises(ValueError, match="meta.json has both 'codebook_size' and its old name 'n_codes'"):
        TokenDataset(token_dir)


def test_ema_warm_up_leaves_the_initialisation_after_one_step(token_dir, tmp_path):
    # ema_decay 0.999 without a warm-up would keep 99.9% of the random initialisation after step 1.
    from sundae.train import ema_decay_at
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.99, 890) == pytest.approx(0.99) and ema_decay_at(0.99, 100) < 0.99
    ds = TokenDataset(token_dir)
    cfg = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=1, batch_size=4, ema_decay=0.999,
                              sample_every=100)
    init = torch.load(train_generator(HG["tiny"], dataclasses.replace(cfg, steps=0), ds, tmp_path / "a",
                                      {"grid": [4, 4]}, progress=False), weights_only=True)["model"]
    one = torch.load(train_generator(HG["tiny"], cfg, ds, tmp_path / "b", {"grid": [4, 4]}, progress=False),
                     weights_only=True)
    moved = [((one["ema"][k] - init[k]).norm() / (one["model"][k] - init[k]).norm()).item()
             for k in init if init[k].is_floating_point() and (one["model"][k] - init[k]).norm() > 0]
    assert len(moved) > 5 and min(moved) >= 0.9 - 1e-4, moved


def test_dead_code_restart_reaches_the_ema_codebook_and_uses_distinct_vectors():
    import copy

    from sundae.distributed import setup
    from sundae.train import restart_dead_codes
    from sundae.vqgan import VQGAN
    torch.manual_seed(0)
    model = VQGAN(VQ["tiny"])
    ema = copy.deepcopy(model)
    before = model.quantizer.codebook.weight.detach().clone()
    # One flat image repeated: its 8x8 encoder outputs hold at most 64 distinct vectors (edges differ).
    batch = torch.full((4, 3, 32, 32), 0.3)
    distinct = len(model.encoder(batch).permute(0, 2, 3, 1).flatten(0, 2).unique(dim=0))
    usage = torch.zeros(64, dtype=torch.long)
    usage[:5] = 1  # 59 dead codes
    n = restart_dead_codes(model, ema, batch, usage, setup("cpu"))
    raw, avg = model.quantizer.codebook.weight.detach(), ema.quantizer.codebook.weight.detach()
    changed = (raw != before).any(1)
    assert n == min(59, distinct) == changed.sum() and not changed[:5].any()
    torch.testing.assert_close(avg[5:], raw[5:], rtol=0, atol=0)  # the EMA codebook restarted too
    assert len(raw[changed].unique(dim=0)) == n  # no two codes restarted onto one vector


@pytest.mark.parametrize("field,value", [("ema_decay", 1.5), ("ema_decay", float("nan")), ("warmup_steps", -1),
                                         ("grad_clip", -1.0), ("lr", 0.0), ("weight_decay", float("inf")),
                                         ("betas", (0.9, 1.0))])
def test_settings_that_would_ruin_a_run_are_refused(field, value):
    from sundae.train_config import GeneratorTrainConfig, VQGANTrainConfig
    for config in (GeneratorTrainConfig, VQGANTrainConfig):
        if field not in {f.name for f in dataclasses.fields(config)}:
            continue
        with pytest.raises(ValueError, match=field):
            config(**{field: value})


def test_patches_larger_than_the_token_grid_are_refused(token_dir, tmp_path):
    cfg = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=1, batch_size=4)
    with pytest.raises(ValueError, match="shorten_factor 8 makes 8x8 patches, larger than the 4x4 token grid"):
        train_generator(dataclasses.replace(HG["tiny"], shorten_factor=8), cfg, TokenDataset(token_dir),
                        tmp_path / "g", {"grid": [4, 4]}, progress=False)
    assert not (tmp_path / "g" / "generator.pt").exists()


def test_dead_code_restarts_are_counted_and_never_at_the_last_step(image_folder, tmp_path):
    # Restart checks after every step of 3: at the starts of steps 2 and 3, none after the last.
    cfg = dataclasses.replace(VQGAN_TRAIN_PRESETS["tiny"], steps=3, batch_size=4, restart_dead_codes=1,
                              log_every=1, disc_start=100)
    path = train_vqgan(VQ["tiny"], cfg, ImageFolder(image_folder, 32, 3), tmp_path / "tok", progress=False)
    records = [json.loads(line) for line in (tmp_path / "tok" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["codes_restarted"] == 0 and records[1]["codes_restarted"] > 0
    assert torch.load(path, weights_only=True)["step"] == 3


def test_every_tokenizer_preset_has_a_collapse_remedy():
    assert all(cfg.restart_dead_codes > 0 for cfg in VQGAN_TRAIN_PRESETS.values()), VQGAN_TRAIN_PRESETS


def test_cosine_lr_warms_up_then_falls_to_zero_at_the_last_step(token_dir, tmp_path):
    cfg = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=110, warmup_steps=10, lr_schedule="cosine")
    factors = [lr_factor(cfg, s) for s in range(cfg.steps + 1)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0) and factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.5)  # half-way through the 100 decay steps
    assert factors[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    constant = dataclasses.replace(cfg, lr_schedule="constant")
    assert [lr_factor(constant, s) for s in (0, 9, 10, 110)] == pytest.approx([0.1, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="lr_schedule"):
        dataclasses.replace(cfg, lr_schedule="linear")
    # The training loop follows it: the logged lr of the last step is the schedule's, near 0.
    run = dataclasses.replace(cfg, steps=8, warmup_steps=0, batch_size=4, log_every=1, lr=1e-3)
    train_generator(HG["tiny"], run, TokenDataset(token_dir), tmp_path / "g", {"grid": [4, 4]}, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "g" / "log.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in logged if "lr" in r}
    assert lrs[1] == pytest.approx(1e-3 * lr_factor(run, 1))
    assert lrs[8] == pytest.approx(0.0, abs=1e-12) and lrs[4] == pytest.approx(1e-3 * lr_factor(run, 4))


def test_bf16_tokenizer_training_keeps_float32_weights_and_codebook_distances(image_folder, tmp_path):
    """The quickstart trains its tokenizer under bf16 autocast (1.6-2.3x faster on CPU): the nearest code
    must still be chosen by float32 distances, and the adversarial phase must stay finite."""
    from sundae.vqgan import VQGAN
    torch.manual_seed(0)
    quantizer = VQGAN(VQ["tiny"]).quantizer
    z = torch.randn(8, VQ["tiny"].embed_dim, 16, 16)  # bf16 distances pick another code for 10-16 of these 2048
    exact = quantizer.lookup(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(quantizer.lookup(z), exact)
    cfg = dataclasses.replace(VQGAN_TRAIN_PRESETS["tiny"], steps=4, batch_size=4, disc_start=1, log_every=1,
                              precision="bf16")
    path = train_vqgan(VQ["tiny"], cfg, ImageFolder(image_folder, 32, 3), tmp_path / "t", progress=False)
    state = torch.load(path, weights_only=True)
    for part in ("model", "disc"):
        for key, value in state[part].items():
            assert not value.is_floating_point() or (value.dtype == torch.float32 and value.isfinite().all()), key
    logged = [json.loads(line) for line in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    adversarial = [r for r in logged if r.get("step", 0) > 1 and "d_loss" in r]
    assert adversarial and all(np.isfinite(r["loss"]) and np.isfinite(r["d_loss"]) for r in adversarial)
