"""Text conditioning: the frozen local encoder, the hourglass's cross-attention and null text, guidance."""

import dataclasses

import pytest
import torch

from sundae.pipeline import class_logits_fn
from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Hourglass
from sundae.text import TextEncoder

CFG = dataclasses.replace(HG["tiny"], num_classes=0, text_dim=12)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Hourglass(CFG).eval()
    with torch.no_grad():  # init-sized projections barely move the logits: make the text matter
        for p in model.text_embedding.parameters():
            p.normal_(0, 1.0)
    return model


def _text(b=3, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    features, pooled = torch.randn(b, n, 12, generator=g), torch.randn(b, 12, generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 2:] = False
    return features, mask, pooled


def test_text_changes_logits_and_padding_does_not(net):
    z = torch.randint(0, 64, (3, 4, 4), generator=torch.Generator().manual_seed(1))
    features, mask, pooled = _text()
    with torch.no_grad():
        base = net(z, text=(features, mask, pooled))
        other = net(z, text=(features.flip(0), mask, pooled.flip(0)))
        # Longer padding with other values, and other values in row 1's padded positions: never attended to.
        pad = torch.randn(3, 4, 12) * 100
        padded = net(z, text=(torch.cat([features, pad], 1), torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1),
                              pooled))
        features2 = features.clone()
        features2[1, 2:] = 1e4
        repadded = net(z, text=(features2, mask, pooled))
    assert (base[0] - other[0]).abs().max() > 1e-2
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(repadded, base, atol=1e-5, rtol=0)


def test_empty_and_dropped_captions_are_finite_and_null(net):
    z = torch.randint(0, 64, (3, 4, 4), generator=torch.Generator().manual_seed(2))
    features, mask, pooled = _text()
    with torch.no_grad():
        all_padding = net(z, text=(features, torch.zeros_like(mask), pooled))
        no_tokens = net(z, text=(features[:, :0], mask[:, :0], pooled))
        dropped = net(z, text=(features, mask, pooled), drop=torch.tensor([True, False, True]))
        null = net(z)
        cond = net(z, text=(features, mask, pooled))
    assert torch.isfinite(all_padding).all() and torch.isfinite(no_tokens).all()
    torch.testing.assert_close(all_padding, no_tokens, atol=1e-5, rtol=0)  # no key but the register either way
    torch.testing.assert_close(dropped[[0, 2]], null[[0, 2]], atol=1e-5, rtol=0)
    torch.testing.assert_close(dropped[1], cond[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="text_dim=0"):
        Hourglass(HG["tiny"])(z, text=(features, mask, pooled))


def test_text_guidance(net):
    z = torch.randint(0, 64, (2, 4, 4), generator=torch.Generator().manual_seed(3))
    text = _text()
    rows = torch.tensor([0, 2])
    with torch.no_grad():
        cond = net(z, text=tuple(t[rows] for t in text))
        uncond = net(z)
        guided = class_logits_fn(net, None, guidance_scale=2.5, text=text)(z, rows, 0)
        plain = class_logits_fn(net, None, text=text)(z, rows, 0)
    torch.testing.assert_close(plain, cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), atol=1e-4, rtol=0)


def test_minilm_encoder_matches_sentence_transformers():
    """Our pooled vector is the mean of the real tokens' features, L2-normalised: sentence-transformers'
    all-MiniLM-L6-v2 pipeline (Pooling mean + Normalize), run here as the independent reference."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    encoder = TextEncoder()
    captions = ["grinning face", "", "red apple"]
    features, mask, pooled = encoder.encode(captions)
    assert features.shape[0] == 3 and features.shape[2] == encoder.dim == 384 and features.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist()[1] == 2  # the empty caption: [CLS] [SEP]
    from sundae.text import default_model_path
    ref = sentence_transformers.SentenceTransformer(str(default_model_path()), device="cpu").encode(
        captions, convert_to_tensor=True)
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=0)
    # The same model given as a local folder path: the alternative to the default name, recorded by path.
    by_path = TextEncoder(default_model_path())
    assert by_path.name == str(default_model_path().resolve())
    torch.testing.assert_close(by_path.encode(captions)[2], pooled, atol=0, rtol=0)


def test_missing_encoder_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder(tmp_path / "nothing")
    with pytest.raises(ValueError, match="config.json"):
        TextEncoder(tmp_path)


def test_forward_flops_count_the_cross_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sundae.hourglass import forward_flops
    net = Hourglass(CFG)
    text = _text(b=2, n=5)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(torch.randint(0, 64, (2, 8, 12)), text=text)
    assert forward_flops(CFG, 8, 12, batch=2, text_len=5) == counter.get_total_flops()
    assert forward_flops(CFG, 8, 12, batch=2, text_len=5) > forward_flops(HG["tiny"], 8, 12, batch=2)
