"""LoRA for prefill modules: a low-rank delta on the base's linear layers, saved on its own (a few MB).

Training wraps the target `nn.Linear`s of a copy of the base in `LoRALinear` (base weight frozen, A and B trained;
B starts at zero, so training starts from the base). A LoRA prefill module directory holds the base's config and
tokenizer, `adapter.safetensors` (`<linear>.lora_A` [r, in], `<linear>.lora_B` [out, r]) and `sunray.json` with
`lora` = {rank, alpha, targets, base_model, base_weights}; `load_model` loads the base named there, checks its
weights hash, and merges W + (alpha / r) B A into it, so the engine runs a plain decoder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from sunray.models.files import load_state_dict, resolve_model_dir
from sunray.models.fingerprint import weights_hash

ADAPTER_FILE = "adapter.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.dropout(x) @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)
        return self.base(x) + delta * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def _targets(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    out = []
    for name, module in model.named_modules():
        if ".layers." not in f".{name}.":
            continue
        for attr in targets:
            if isinstance(getattr(module, attr, None), (nn.Linear, LoRALinear)):
                out.append((f"{name}.{attr}", module, attr))
    return out


def check_targets(targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    bad = [t for t in targets if t not in DEFAULT_TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown LoRA targets {bad or '(none)'}; choose from {', '.join(DEFAULT_TARGETS)}")
    return tuple(targets)


def add_lora(model: nn.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS, dropout: float = 0.0) -> int:
    """Freeze `model` and wrap its target linears with trainable LoRA. Returns the number of trainable parameters."""
    targets = check_targets(targets)
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    for _, parent, attr in _targets(model, targets):
        lin = getattr(parent, attr)
        if isinstance(lin, nn.Linear):
            setattr(parent, attr, LoRALinear(lin, rank, alpha, dropout))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{name}.lora_A"] = module.lora_A.detach().float().cpu().contiguous()
            out[f"{name}.lora_B"] = module.lora_B.detach().float().cpu().contiguous()
    return out


def merge_adapter_into_state(
    state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], info: dict[str, Any]
) -> None:
    """Add an adapter's deltas to a base state dict in place (transformers names: `<linear>.weight`)."""
    scaling = float(info["alpha"]) / int(info["rank"])
    prefixes = sorted({k.rsplit(".", 1)[0] for k in adapter})
    for prefix in prefixes:
        a, b = adapter.get(f"{prefix}.lora_A"), adapter.get(f"{prefix}.lora_B")
        key = f"{prefix}.weight"
        if a is None or b is None or key not in state:
            raise ValueError(f"adapter tensor {prefix} does not match the base (no {key}, or A/B missing)")
        w = state[key]
        delta = (b.float() @ a.float()) * scaling
        if delta.shape != w.shape:
            raise ValueError(f"{prefix}: adapter delta {tuple(delta.shape)} != base weight {tuple(w.shape)}")
        state[key] = (w.float() + delta).to(w.dtype)


def load_lora_state(model_dir: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The merged state dict of a LoRA prefill module directory (base weights + adapter)."""
    info = manifest["lora"]
    base_dir = resolve_model_dir(info["base_model"])
    state = load_state_dict(base_dir)
    if info.get("base_weights") and weights_hash(state) != info["base_weights"]:
        raise ValueError(
            f"LoRA module {model_dir}: its base {info['base_model']} has other weights than it was trained on "
            f"(weights hash {weights_hash(state)} != {info['base_weights']})"
        )
    path = model_dir / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"LoRA module {model_dir} has no {ADAPTER_FILE}")
    merge_adapter_into_state(state, load_file(str(path)), info)
    return state
