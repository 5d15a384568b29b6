"""SundaePipeline: per-sample seeds, loading every kind of generator path, bundles that travel, conditions."""

import dataclasses
import json
import shutil

import pytest
import torch
from PIL import Image

from sundae import SamplerConfig, SundaePipeline
from sundae.checkpoint import export_bundle, save_checkpoint
from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Hourglass
from sundae.images import image_to_tensor, tensor_to_image
from sundae.io import file_digest
from sundae.sundae import SAMPLER_PRESETS, fill_masked, guided_logits_fn, sample
from sundae.vqgan import PRESETS as VQ
from sundae.vqgan import VQGAN

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = SamplerConfig(steps=6, min_steps=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A quickstart-like folder of untrained tiny checkpoints: ROOT/tokenizer/tokenizer.pt and
    ROOT/generator/generator.pt (2 classes named "cat" and "dog", trained "on" the tokenizer's 8x8 grids)."""
    root = tmp_path_factory.mktemp("qs")
    torch.manual_seed(0)
    vq = VQGAN(VQ["tiny"])
    (root / "tokenizer").mkdir()
    save_checkpoint(root / "tokenizer" / "tokenizer.pt", "tokenizer", vq.cfg, vq, ema=None)
    tok = root / "tokenizer" / "tokenizer.pt"
    meta = {"grid": [8, 8], "tokenizer": str(tok), "tokenizer_sha256": file_digest(tok), "class_names": ["cat", "dog"]}
    net = Hourglass(dataclasses.replace(HG["tiny"], num_classes=2))
    (root / "generator").mkdir()
    save_checkpoint(root / "generator" / "generator.pt", "generator", net.cfg, net, ema=None, meta=meta, step=7)
    return root


def test_sample_i_is_the_same_drawn_alone_with_its_seed(run):
    pipe = SundaePipeline.from_pretrained(run)
    batch = pipe(num=5, seed=3, batch_size=2, sampler=FAST, output_type="pt", progress=False)
    assert batch.images.shape == (5, 3, 32, 32) and batch.tokens.shape == (5, 8, 8) and batch.steps.shape == (5,)
    assert len({tuple(t.flatten().tolist()) for t in batch.tokens}) == 5  # different seeds, different samples
    for i in (0, 3, 4):  # class i mod 2 when all classes cycle
        alone = pipe(num=1, class_labels=i % 2, seed=3 + i, sampler=FAST, output_type="pt", progress=False)
        assert torch.equal(alone.tokens[0], batch.tokens[i]) and torch.equal(alone.images[0], batch.images[i])
        assert alone.steps[0] == batch.steps[i]
    listed = pipe(num=2, seed=[6, 7], sampler=FAST, output_type="pt", progress=False, class_labels=[1, 0])
    assert torch.equal(listed.tokens, batch.tokens[3:5])


def test_every_kind_of_path_loads_the_same_pair(run, tmp_path):
    pipes = [SundaePipeline.from_pretrained(p) for p in (run, run / "generator", run / "generator" / "generator.pt")]
    export_bundle(run / "generator", tmp_path / "bundle")
    pipes.append(SundaePipeline.from_pretrained(tmp_path / "bundle"))
    first = pipes[0](num=2, seed=1, sampler=FAST, output_type="pt", progress=False)
    for pipe in pipes[1:]:
        again = pipe(num=2, seed=1, sampler=FAST, output_type="pt", progress=False)
        assert torch.equal(again.images, first.images)


def test_a_copied_bundle_samples_the_same_images_without_the_run(run, tmp_path):
    export_bundle(run, tmp_path / "bundle", sampler=SAMPLER_PRESETS["ffhq1024"])
    info = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert info["bundle"] == {"tokenizer": "tokenizer"} and info["kind"] == "generator"
    for part in ("", "tokenizer/"):
        assert (tmp_path / "bundle" / f"{part}config.json").is_file()
        assert (tmp_path / "bundle" / f"{part}model.safetensors").is_file()
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert "trained for 7 steps" in card and "cat, dog" in card and "temperature 1.0 -> 0.7" in card
    expected = SundaePipeline.from_pretrained(run)(num=3, seed=0, sampler=FAST, output_type="pt", progress=False)
    # Elsewhere, with the original run gone: only the bundle's own files are read.
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tmp_path / "bundle", moved)
    shutil.rmtree(tmp_path / "bundle")
    hidden = run.parent / (run.name + "_hidden")
    run.rename(hidden)
    try:
        pipe = SundaePipeline.from_pretrained(moved)
        assert pipe.sampler == SAMPLER_PRESETS["ffhq1024"]  # the bundle's sampler is the default
        got = pipe(num=3, seed=0, sampler=FAST, output_type="pt", progress=False)
    finally:
        hidden.rename(run)
    assert torch.equal(got.images, expected.images)


def test_a_moved_run_folder_finds_its_tokenizer_by_sha256(run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)  # the checkpoint still records the old absolute tokenizer path
    ckpt = torch.load(moved / "generator" / "generator.pt", weights_only=True)
    ckpt["meta"]["tokenizer"] = str(tmp_path / "gone" / "tokenizer.pt")
    torch.save(ckpt, moved / "generator" / "generator.pt")
    assert SundaePipeline.from_pretrained(moved).tokenizer_path == str(moved / "tokenizer" / "tokenizer.pt")
    # A different tokenizer in the same place is not taken for it.
    torch.manual_seed(5)
    other = VQGAN(VQ["tiny"])
    save_checkpoint(moved / "tokenizer" / "tokenizer.pt", "tokenizer", other.cfg, other, ema=None)
    with pytest.raises(ValueError, match=r"does not exist \(moved\?\)"):
        SundaePipeline.from_pretrained(moved)


def test_conditions_are_checked(run):
    pipe = SundaePipeline.from_pretrained(run)
    assert pipe.labels(None, 5).tolist() == [0, 1, 0, 1, 0]
    assert pipe.labels("dog", 3).tolist() == [1, 1, 1]
    assert pipe.labels(["dog", 0], 3).tolist() == [1, 0, 1]
    for bad in (2, -1, [0, 2], "bird"):  # 2 = num_classes would be the null class: never taken silently
        with pytest.raises(ValueError, match="trained classes"):
            pipe.labels(bad, 2)
    with pytest.raises(ValueError, match="not text-conditional"):
        pipe(num=1, prompt="a cat", sampler=FAST)
    with pytest.raises(ValueError, match="output_type"):
        pipe(num=1, sampler=FAST, output_type="np")
    with pytest.raises(ValueError, match="2 seeds for 3 samples"):
        pipe(num=3, seed=[1, 2], sampler=FAST)
    images = pipe(num=2, sampler=FAST, progress=False).images
    assert [im.size for im in images] == [(32, 32), (32, 32)] and images[0].mode == "RGB"


def test_inpaint_keeps_the_known_cells_and_reconstruct_round_trips(run):
    pipe = SundaePipeline.from_pretrained(run)
    image = torch.rand(3, 30, 17) * 2 - 1
    mask = torch.zeros(1, 30, 17)
    mask[:, 8:16, 4:12] = 1
    out = pipe.inpaint(image, mask, num=3, class_labels=1, sampler=FAST, seed=2, output_type="pt")
    assert out.images.shape == (3, 3, 30, 17)
    keep = torch.ones(30, 17, dtype=torch.bool)
    keep[8:16, 4:12] = False  # the masked cells (f=4): rows 8..15, columns 4..11
    assert torch.equal(out.images[:, :, keep], image[None].expand(3, -1, -1, -1)[:, :, keep])
    again = pipe.inpaint(image, mask, num=1, class_labels=1, sampler=FAST, seed=4, output_type="pt")
    assert torch.equal(again.images[0], out.images[2])  # completion i has seed + i
    with pytest.raises(ValueError, match="class-conditional"):
        pipe.inpaint(image, mask, num=1, sampler=FAST)
    with pytest.raises(ValueError, match="same size"):
        pipe.inpaint(image, mask[:, :20], num=1, class_labels=0, sampler=FAST)
    recon = pipe.reconstruct(image[None])
    assert recon.shape == (1, 3, 30, 17) and torch.equal(pipe.encode(recon), pipe.encode(recon))
    # PIL images encode as their tensors do (8-bit pixels, so the tensor is the PIL round trip of `image`).
    pil = tensor_to_image(image)
    tokens = pipe.encode(image_to_tensor(pil)[None])
    assert tokens.shape == (1, 8, 5) and torch.equal(pipe.encode(pil), tokens)
    assert torch.equal(pipe.encode([pil, pil.convert("L").convert("RGB")])[0], tokens[0])
    with pytest.raises(ValueError, match="one size"):
        pipe.encode([pil, pil.crop((0, 0, 10, 10))])


def test_inpainting_knows_nothing_of_the_masked_pixels(run):
    """Issue 19: the kept tokens were encoded from the whole image, so the completions moved toward what the
    mask hid. Two images equal outside the mask give bit-identical kept tokens and completions."""
    pipe = SundaePipeline.from_pretrained(run)
    torch.manual_seed(5)
    image = torch.rand(3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    other = torch.where(mask.bool(), -image, image)
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2:6, 2:6] = False
    for passes in (1, 2):
        outs = [pipe.inpaint(x, mask, num=2, class_labels=0, sampler=FAST, seed=9, output_type="pt", passes=passes)
                for x in (image, other)]
        assert torch.equal(outs[0].tokens, outs[1].tokens) and torch.equal(outs[0].images, outs[1].images)
        if passes == 1:  # the kept tokens are the fill's
            one = outs[0]
            assert torch.equal(one.tokens[:, keep], pipe.encode(fill_masked(image[None], mask[None]))[0, keep].expand(2, -1))
    # A second pass keeps the tokens of the first pass's completion (encoded one at a time), and samples the
    # regenerated cells again: the first pass is the same draw, so its completions are `one`'s.
    again = pipe.encode(one.images[0:1])[0], pipe.encode(one.images[1:2])[0]
    assert all(torch.equal(outs[0].tokens[i, keep], again[i][keep]) for i in range(2))
    assert outs[0].steps.tolist() == [2 * FAST.steps] * 2
    with pytest.raises(ValueError, match="passes must be >= 1"):
        pipe.inpaint(image, mask, num=1, class_labels=0, sampler=FAST, passes=0)
    for kwargs, message in (({"num": 0}, "num must be >= 1"), ({"num": -1}, "num must be >= 1"),
                            ({"image": image[None]}, "one `c H W` tensor"),
                            ({"mask": Image.new("L", (32, 32))}, "the mask must be a tensor")):
        args = {"image": image, "mask": mask, "num": 1, **kwargs}
        with pytest.raises(ValueError, match=message):
            pipe.inpaint(args.pop("image"), args.pop("mask"), class_labels=0, sampler=FAST, **args)
    # The old way, encoding the whole image, lets the hidden pixels change kept tokens of this very tokenizer.
    assert not torch.equal(pipe.encode(image[None])[0, keep], pipe.encode(other[None])[0, keep])


def test_sampler_config_is_validated_once_and_holds_the_papers_presets():
    assert SamplerConfig() == SamplerConfig(100, (0.8, 0.8), (0.5, 0.5), 10, True)
    assert SamplerConfig(temperature=1.0).temperature == (1.0, 1.0)
    assert SAMPLER_PRESETS["ffhq1024"].temperature == (1.0, 0.7)
    assert SAMPLER_PRESETS["imagenet256"] == SamplerConfig(200, (0.8, 0.7), (0.7, 0.7))
    for kwargs, message in (({"steps": 0}, "steps must be >= 1, got 0"), ({"min_steps": -1}, "min_steps must be >= 0"),
                            ({"temperature": float("nan")}, "temperature must be finite"),
                            ({"update_proportion": (0.5, 1.5)}, r"update proportion must lie in \(0, 1\]"),
                            ({"steps": 2.5}, "steps must be an integer")):
        with pytest.raises(ValueError, match=message):
            SamplerConfig(**kwargs)
    with pytest.raises(ValueError, match="steps must be >= 1"):  # sample's overrides go through the same checks
        sample(lambda z, rows, step: torch.zeros(*z.shape, 4), (1, 2, 2), 4, steps=0)


def test_early_stop_off_runs_every_step():
    def copy(z, rows, step):  # the tokens as they are: nothing ever changes
        return torch.nn.functional.one_hot(z, 4).float() * 100
    _, taken = sample(copy, (3, 2, 2), 4, SamplerConfig(steps=20, min_steps=2), generator=torch.Generator().manual_seed(0))
    assert taken.tolist() == [2, 2, 2]
    _, taken = sample(copy, (3, 2, 2), 4, SamplerConfig(steps=20, min_steps=2, early_stop=False))
    assert taken.tolist() == [20, 20, 20]


def test_guidance_holds_no_state_between_runs():
    def conditioned(z, rows, drop):  # conditional logits 1, unconditional 0: the guided logits are s_n
        return (~drop).float()[:, None, None, None].expand(*z.shape, 4)
    fn = guided_logits_fn(conditioned, (0.0, 2.0), steps=3)
    z, rows = torch.zeros(1, 2, 2, dtype=torch.long), torch.arange(1)
    for _ in range(2):  # the same function for a second run: the same scales, read from the step index
        assert [fn(z, rows, n)[0, 0, 0, 0].item() for n in (0, 1, 2, 5)] == [0.0, 1.0, 2.0, 2.0]


def test_the_public_api_is_importable_from_the_package():
    import sundae
    for name in ("SundaePipeline", "SamplerConfig", "SAMPLER_PRESETS", "VQGAN", "VQGANConfig", "Hourglass",
                 "HourglassConfig", "sample", "unrolled_loss", "corrupt", "HOURGLASS_PRESETS", "VQGAN_PRESETS"):
        assert hasattr(sundae, name), name


def test_a_bundle_loads_with_huggingface_hub_conventions(run, tmp_path):
    """Each component folder is config.json + model.safetensors: huggingface_hub's PyTorchModelHubMixin loads
    it into our classes with a constructor that reads the stored config."""
    hub = pytest.importorskip("huggingface_hub")
    from sundae.checkpoint import config_from_dict
    from sundae.hourglass import HourglassConfig
    from sundae.vqgan import VQGANConfig

    export_bundle(run, tmp_path / "bundle")
    pipe = SundaePipeline.from_pretrained(tmp_path / "bundle")
    for base, cfg_cls, folder, ours in ((Hourglass, HourglassConfig, tmp_path / "bundle", pipe.generator),
                                        (VQGAN, VQGANConfig, tmp_path / "bundle" / "tokenizer", pipe.tokenizer)):
        class HubModel(base, hub.PyTorchModelHubMixin):
            def __init__(self, config: dict, **stored):
                super().__init__(config_from_dict(cfg_cls, config))

        loaded = HubModel.from_pretrained(str(folder))
        assert loaded.state_dict().keys() == ours.state_dict().keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_wrong_folders_say_what_they_hold(run, tmp_path):
    from sundae.checkpoint import load_checkpoint
    with pytest.raises(ValueError, match="holds a tokenizer.pt, but a generator was expected"):
        SundaePipeline.from_pretrained(run / "tokenizer")  # a tokenizer's run folder as the generator
    export_bundle(run, tmp_path / "bundle")
    assert load_checkpoint(tmp_path / "bundle", None)["kind"] == "generator"  # either kind asked: it says which
    with pytest.raises(FileNotFoundError, match="already shareable"):
        export_bundle(tmp_path / "bundle", tmp_path / "again")
