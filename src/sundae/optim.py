"""The training loops' optimizers: Adam/AdamW with the fused kernel where it runs, and the generator's choice
between AdamW alone and Muon for its hidden weight matrices (`GeneratorTrainConfig.optimizer`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Parameters of the hourglass that Muon updates (with `optimizer="muon"`): the 2D weights of its hidden layers,
# the transformer and resample blocks and the patch merge and split. Embeddings, the output layer, norms and
# biases stay with AdamW, as Jordan et al. and Liu et al. advise.
MUON_MODULES = ("pre.", "valley.", "post.", "down_resample.", "up_resample.", "shorten.", "upsample.")


def fused_optimizer(device: torch.device, sharded: bool = False) -> dict[str, bool]:
    """`fused=True` for Adam/AdamW on CPU and CUDA unless the parameters are FSDP2-sharded DTensors.

    On the CPU the default ("foreach") update runs its steps parameter by parameter: 22 ms of a 0.45 s
    quickstart generator step on one thread, against 10 ms for the fused kernel (the same update up to
    float rounding). Other devices keep the default. `keep_fused` restores the setting after a resume.
    """
    return {"fused": True} if device.type in ("cpu", "cuda") and not sharded else {}


def keep_fused(opts: list[torch.optim.Optimizer], fused: dict[str, bool]) -> None:
    """Put `fused` (from `fused_optimizer`) back into optimizers whose state a resume loaded: the saved groups
    carry the old run's setting, and a checkpoint saved without it would leave an optimizer that GradScaler
    treats as fused (fp16 runs then fail in the unfused update) or a fused update on FSDP2-sharded weights."""
    for opt in opts:
        for group in opt.param_groups:
            group["fused"] = fused.get("fused")
            if group["fused"]:
                group["foreach"] = None
                for p in group["params"]:  # the fused kernels take the step count as float32 on the device
                    state = opt.state.get(p, {})
                    if torch.is_tensor(state.get("step")):
                        state["step"] = state["step"].to(p.device, torch.float32)


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Whether `optimizer="muon"` updates hourglass parameter `name` with Muon (a hidden 2D weight)."""
    return p.ndim == 2 and name.startswith(MUON_MODULES)


def muon(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """`torch.optim.Muon` over 2D `params`, its update rescaled to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`,
    see `generator_optimizers`), so that AdamW's `lr` and `weight_decay` apply as they are.
    Raises ValueError on a torch without `torch.optim.Muon` (before 2.9)."""
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"optimizer 'muon' needs torch.optim.Muon (PyTorch 2.9 or later); this is torch "
                         f"{torch.__version__}: upgrade torch, or use optimizer 'adamw'")
    return torch.optim.Muon(params, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")


def generator_optimizers(model: nn.Module, cfg: Any, fused: dict[str, bool],
                         sharded: bool = False) -> dict[str, torch.optim.Optimizer]:
    """The generator's optimizers, keyed by their checkpoint names, for `cfg` (a `GeneratorTrainConfig`).

    "adamw": {"optimizer": AdamW} over every parameter, weight decay on matrices but not on embeddings.
    "muon": the same AdamW over the parameters `is_muon_param` leaves, plus {"optimizer_muon": Muon} over the
    hidden matrices (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks":
    momentum 0.95 with Nesterov, the update orthogonalised by 5 Newton-Schulz steps; `torch.optim.Muon`).
    Its update is rescaled to AdamW's RMS, 0.2 * sqrt(max(rows, cols)) (Liu et al. 2025, "Muon is Scalable
    for LLM Training", section 2.2), so that `cfg.lr`, its schedule and `cfg.weight_decay` serve both.
    Raises ValueError for "muon" on FSDP2-sharded parameters (the Newton-Schulz steps need whole matrices) or
    on a torch without `torch.optim.Muon` (before 2.9). `to_kv` is one matrix, so K and V are orthogonalised
    together.
    """
    if cfg.optimizer == "muon" and sharded:
        raise ValueError("optimizer 'muon' needs whole weight matrices: use sharding 'ddp' with it, or "
                         "optimizer 'adamw' with sharding 'fsdp'")
    decay, no_decay, hidden = [], [], []
    for name, p in model.named_parameters():
        if cfg.optimizer == "muon" and is_muon_param(name, p):
            hidden.append(p)
        else:
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    opts: dict[str, torch.optim.Optimizer] = {"optimizer": torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, **fused)}
    if hidden:
        opts["optimizer_muon"] = muon(hidden, cfg.lr, cfg.weight_decay)
    return opts
