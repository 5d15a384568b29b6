"""Read a taming-transformers VQ-GAN (Esser et al., arXiv 2012.09841) into our tokenizer format.

The paper's 256x256 results use the public taming-transformers tokenizers (f=16, 1024 codes; ImageNet,
FFHQ, CelebA-HQ). Their `VQModel` and our `VQGAN` compute the same function (`tests/test_convert.py`
proves it against the reference code); only the parameter names differ:

    taming VQModel                               sundae VQGAN
    encoder.down.{level}.block.{i}               encoder.down.{n}      (ResnetBlock; nin_shortcut -> shortcut)
    encoder.down.{level}.attn.{i}                encoder.down.{n}      (AttnBlock; q, k, v -> qkv, proj_out -> proj)
    encoder.down.{level}.downsample              encoder.down.{n}
    {en,de}coder.mid.block_1 / attn_1 / block_2  {en,de}coder.mid.0 / 1 / 2
    quant_conv                                   encoder.quant_conv
    post_quant_conv                              decoder.post_quant_conv
    decoder.up.{level}.block / attn / upsample   decoder.up.{n}        (levels in decoding order)
    quantize.embedding                           quantizer.codebook

`n` counts our flat `nn.Sequential` in build order. Keys under `loss.` (the LPIPS network and the
PatchGAN discriminator, training only) are ignored. Loading never runs pickled code: see
`read_lightning_checkpoint`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from sundae.checkpoint import FORMAT, save_checkpoint
from sundae.io import refused_globals
from sundae.vqgan import VQGAN, VQGANConfig

TAMING_VQMODEL = "taming.models.vqgan.VQModel"
FIRST_STAGE = "first_stage_model."  # prefix of the tokenizer inside a taming transformer checkpoint
# PyTorch Lightning 1.x keys the saved callback states by the callback's class, so a `.ckpt` names these
# classes as pickle globals. They load as the inert stand-ins below: nothing of Lightning is imported or run.
LIGHTNING_CALLBACKS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                       "pytorch_lightning.callbacks.early_stopping.EarlyStopping")
_STAND_INS = [(type(name.rsplit(".", 1)[1], (), {"__doc__": f"Inert stand-in for {name}."}), name)
              for name in LIGHTNING_CALLBACKS]
_RENAMES = {"shortcut": ("nin_shortcut",), "proj": ("proj_out",), "qkv": ("q", "k", "v")}


def read_lightning_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The `state_dict` of a Lightning `.ckpt` (or a bare state dict file), read without running pickled code.

    The file is read by `torch.load(weights_only=True)`: tensors, numbers, strings and plain containers
    only, plus the Lightning 1.x callback classes in `LIGHTNING_CALLBACKS` used as dict keys (read as inert
    stand-ins). Anything else (an OmegaConf or argparse hyper-parameter object, a numpy scalar, ...) is refused.
    Raises FileNotFoundError, IsADirectoryError for a folder, or ValueError naming the file and the refused
    globals, saying it is already a sundae checkpoint, or saying what is missing (no `state_dict`,
    non-tensor values).
    """
    path = _existing_file(path, "checkpoint", "a taming checkpoint file", "*.ckpt")
    with torch.serialization.safe_globals(_STAND_INS):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            refused = refused_globals(path, err) if isinstance(err, pickle.UnpicklingError) else []
            if refused:
                raise ValueError(f"{path}: refused: it holds pickled objects beyond tensors and plain containers "
                                 f"({', '.join(refused)}), and loading those could run code; re-save its "
                                 f"'state_dict' alone with torch.save where you trust the file") from None
            raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and "kind" in ckpt:
        if ckpt["kind"] == "tokenizer":
            raise ValueError(f"{path} is already a sundae tokenizer checkpoint: use it directly "
                             f"(--tokenizer {path}); convert-taming reads taming-transformers checkpoints")
        raise ValueError(f"{path} is a sundae {ckpt['kind']} checkpoint, not a taming-transformers VQ-GAN")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: expected a Lightning checkpoint with a 'state_dict' or a state dict, "
                         f"got {type(ckpt).__name__}")
    bad = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if bad:
        raise ValueError(f"{path}: the state dict holds non-tensor values under {_listing(bad)}")
    return state


def _existing_file(path: str | Path, what: str, expected: str, pattern: str) -> Path:
    """`path` as a Path if it is a file; FileNotFoundError if it does not exist, IsADirectoryError naming
    `expected` (and the files matching `pattern` inside, if any) if it is a folder."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(pattern))
        hint = f": did you mean {_listing([str(p) for p in found], 3)}?" if found else ""
        raise IsADirectoryError(f"{what} {path} is a folder, expected {expected}{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def _listing(names: list[str], limit: int = 20) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_taming_config(path: str | Path) -> VQGANConfig:
    """Our `VQGANConfig` from a taming YAML: a VQModel config (`model.params` holds `ddconfig`,
    `n_embed`, `embed_dim`) or a transformer config whose `model.params.first_stage_config` is one.

    Raises FileNotFoundError, IsADirectoryError for a folder, or ValueError naming the file and the field:
    a `target` other than
    taming.models.vqgan.VQModel (Gumbel or segmentation variants), `double_z: true`, `in_channels` !=
    `out_ch`, `resamp_with_conv: false`, an index `remap`, widths that are not multiples of 32, or missing
    fields.
    """
    path = _existing_file(path, "config", "a taming YAML file", "*.yaml")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not readable YAML: {str(err).splitlines()[0]}") from None

    def section(node: Any, key: str, where: str) -> dict[str, Any]:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            raise ValueError(f"{path}: expected a mapping `{where}{key}` (a taming VQModel config)")
        return node[key]

    model = section(doc, "model", "")
    params = section(model, "params", "model.")
    target, where = model.get("target"), "model."
    if "ddconfig" not in params and "first_stage_config" in params:  # a transformer: take its tokenizer
        first = section(params, "first_stage_config", "model.params.")
        target, where = first.get("target"), "model.params.first_stage_config."
        params = section(first, "params", where)
    if target is not None and target != TAMING_VQMODEL:
        raise ValueError(f"{path}: {where}target is {target}; only {TAMING_VQMODEL} converts")
    dd = section(params, "ddconfig", where + "params.")
    if params.get("remap") is not None:
        raise ValueError(f"{path}: the quantizer remaps indices (remap: {params['remap']}); not supported")
    if dd.get("double_z", True):
        raise ValueError(f"{path}: ddconfig.double_z must be false for a VQModel (true doubles the encoder "
                         f"output for a KL autoencoder)")
    if not dd.get("resamp_with_conv", True):
        raise ValueError(f"{path}: ddconfig.resamp_with_conv: false (pooling instead of strided convs) is "
                         f"not supported")
    try:
        if dd["in_channels"] != dd["out_ch"]:
            raise ValueError(f"{path}: ddconfig.in_channels {dd['in_channels']} != out_ch {dd['out_ch']}")
        widths = [int(dd["ch"]) * int(m) for m in dd["ch_mult"]]
        if any(w % 32 for w in widths):
            raise ValueError(f"{path}: channel widths {widths} (ch x ch_mult) must be multiples of taming's "
                             f"32 GroupNorm groups")
        return VQGANConfig(
            in_channels=int(dd["in_channels"]), ch=int(dd["ch"]), ch_mult=tuple(int(m) for m in dd["ch_mult"]),
            num_res_blocks=int(dd["num_res_blocks"]), attn_resolutions=tuple(int(r) for r in dd["attn_resolutions"]),
            resolution=int(dd["resolution"]), z_channels=int(dd["z_channels"]), embed_dim=int(params["embed_dim"]),
            codebook_size=int(params["n_embed"]), beta=0.25, norm_groups=32)  # taming: beta 0.25, GroupNorm(32)
    except KeyError as err:
        raise ValueError(f"{path}: missing field {err.args[0]!r} under {where}params") from None
    except TypeError as err:
        raise ValueError(f"{path}: a field under {where}params has the wrong type: {err}") from None


def _module_pairs(cfg: VQGANConfig) -> list[tuple[str, str]]:
    """(our module name, taming module name) for every module that holds parameters, in build order."""
    last = len(cfg.ch_mult) - 1
    pairs = [("encoder.conv_in", "encoder.conv_in")]
    n, res = 0, cfg.resolution
    for level in range(len(cfg.ch_mult)):
        for i in range(cfg.num_res_blocks):
            pairs.append((f"encoder.down.{n}", f"encoder.down.{level}.block.{i}"))
            n += 1
            if res in cfg.attn_resolutions:
                pairs.append((f"encoder.down.{n}", f"encoder.down.{level}.attn.{i}"))
                n += 1
        if level != last:
            pairs.append((f"encoder.down.{n}", f"encoder.down.{level}.downsample"))
            n, res = n + 1, res // 2
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.mid.0", f"{side}.mid.block_1"), (f"{side}.mid.1", f"{side}.mid.attn_1"),
                  (f"{side}.mid.2", f"{side}.mid.block_2"), (f"{side}.norm_out", f"{side}.norm_out"),
                  (f"{side}.conv_out", f"{side}.conv_out")]
    pairs += [("encoder.quant_conv", "quant_conv"), ("decoder.post_quant_conv", "post_quant_conv"),
              ("decoder.conv_in", "decoder.conv_in"), ("quantizer.codebook", "quantize.embedding")]
    n, res = 0, cfg.resolution // cfg.f
    for level in reversed(range(len(cfg.ch_mult))):
        for i in range(cfg.num_res_blocks + 1):
            pairs.append((f"decoder.up.{n}", f"decoder.up.{level}.block.{i}"))
            n += 1
            if res in cfg.attn_resolutions:
                pairs.append((f"decoder.up.{n}", f"decoder.up.{level}.attn.{i}"))
                n += 1
        if level != 0:
            pairs.append((f"decoder.up.{n}", f"decoder.up.{level}.upsample"))
            n, res = n + 1, res * 2
    return pairs


def taming_key_map(model: VQGAN) -> dict[str, tuple[str, ...]]:
    """`model`'s state-dict key -> the taming VQModel key(s) it is made of, in order.

    A fused attention `qkv` weight (`3c c 1 1`) is taming's `q`, `k`, `v` weights concatenated on dim 0
    (our AttnBlock splits its channels as `(three c)`); every other key has one source of the same shape.
    """
    modules = dict(_module_pairs(model.cfg))
    out: dict[str, tuple[str, ...]] = {}
    for key in model.state_dict():
        module, name = key.rsplit(".", 1)
        parent, _, child = module.rpartition(".")
        if module in modules:
            out[key] = (f"{modules[module]}.{name}",)
        elif parent in modules:
            out[key] = tuple(f"{modules[parent]}.{c}.{name}" for c in _RENAMES.get(child, (child,)))
        else:  # a layout change in vqgan.py without a matching change here
            raise AssertionError(f"no taming name for {key}")
    return out


def taming_to_sundae(state: dict[str, Tensor], model: VQGAN, source: str = "checkpoint") -> dict[str, Tensor]:
    """Rename (and fuse q/k/v of) a taming VQModel state dict into a state dict for `model`.

    The tokenizer keys may carry the `first_stage_model.` prefix of a transformer checkpoint (then every
    key outside it is ignored). Keys under `loss.` (LPIPS, discriminator) are ignored. Raises ValueError
    naming `source` and listing the missing and unexpected keys, or the keys whose shapes do not match
    `model`'s config.
    """
    prefix = FIRST_STAGE if any(k.startswith(FIRST_STAGE) for k in state) else ""
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(prefix + "loss.")}
    key_map = taming_key_map(model)
    needed = {t for sources in key_map.values() for t in sources}
    missing, extra = sorted(needed - set(own)), sorted(set(own) - needed)
    if missing or extra:
        parts = [f"missing keys {_listing([prefix + k for k in missing])}" if missing else "",
                 f"unexpected keys {_listing([prefix + k for k in extra])}" if extra else ""]
        raise ValueError(f"{source} does not match its config: " + "; ".join(p for p in parts if p))
    out = {ours: torch.cat([own[t] for t in sources]) if len(sources) > 1 else own[sources[0]]
           for ours, sources in key_map.items()}
    expected = model.state_dict()
    wrong = [f"{prefix}{'/'.join(key_map[k])} {tuple(v.shape)} (config: {tuple(expected[k].shape)})"
             for k, v in out.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{source}: weight shapes do not match its config: {_listing(wrong, 5)}")
    return out


def convert_taming(checkpoint: str | Path, config: str | Path, out: str | Path) -> Path:
    """Convert a taming VQ-GAN (`.ckpt` + `.yaml`) into `out/tokenizer.pt`, our tokenizer checkpoint.

    The result loads with `sundae.checkpoint.load_tokenizer` like one from `sundae train-vqgan` (no EMA
    weights; `meta` records the source files). Raises FileExistsError if `out/tokenizer.pt` exists, and the
    errors of `read_taming_config`, `read_lightning_checkpoint` and `taming_to_sundae`. Both paths are checked
    first, then the checkpoint is read before the config, so a sundae checkpoint given by mistake is named as
    such whatever the config holds.
    """
    target = Path(out) / "tokenizer.pt"
    if target.exists():
        raise FileExistsError(f"{target} exists: choose another --out or remove it")
    _existing_file(checkpoint, "checkpoint", "a taming checkpoint file", "*.ckpt")
    _existing_file(config, "config", "a taming YAML file", "*.yaml")
    state = read_lightning_checkpoint(checkpoint)
    cfg = read_taming_config(config)
    model = VQGAN(cfg)
    model.load_state_dict(taming_to_sundae(state, model, f"{checkpoint} (config {config})"))
    save_checkpoint(target, "tokenizer", cfg, model,
                    meta={"source": "taming-transformers", "checkpoint": str(Path(checkpoint).resolve()),
                          "config": str(Path(config).resolve())})
    return target
