"""A quantized decode module on disk (saving and loading; `sunray.models.loader.load_model` loads it).

The directory holds `config.json` and the tokenizer of the base, `model.safetensors` with `<linear>.qweight`,
`<linear>.scales` (and `<linear>.zeros` for int4) in place of `<linear>.weight`, and `sunray.json` with
`quantization` (scheme, bits, group size, method, calibration) and `base_fingerprint` (the base's, with the scheme
as `quantization`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sunray.models.files import copy_checked
from sunray.models.quant.formats import QuantSpec
from sunray.models.quant.linear import empty_quant_linears, warm_caches


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the embedding
    return state


def save_quantized(
    model: nn.Module,
    info: dict[str, Any],
    base_dir: Path,
    out_dir: str | Path,
    base_fingerprint: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a quantized decode module directory (see the module docstring). `base_dir` gives config + tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in base_dir.iterdir():  # config and tokenizer files; never the base weights or its manifest
        if (
            f.is_file()
            and not f.name.endswith(".safetensors")
            and not f.name.endswith(".index.json")
            and f.name != "sunray.json"
        ):
            shutil.copy2(f, out / f.name)
    save_file(
        quantized_state_dict(model),
        str(out / "model.safetensors"),
        metadata={"format": "pt", "sunray_quantization": info["scheme"]},
    )
    fp = {**base_fingerprint, "quantization": info["scheme"]}
    manifest = {"kind": "decode_module", "quantization": info, "base_fingerprint": fp, **(extra or {})}
    (out / "sunray.json").write_text(json.dumps(manifest, indent=2))
    return out


def load_quantized_weights(model: nn.Module, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Fill `model` (a fresh Decoder) from a quantized checkpoint: swap in QuantLinears, then copy every tensor."""
    spec = QuantSpec(int(info["bits"]), info.get("group_size"), awq=bool(info.get("awq")))
    empty_quant_linears(model, spec)
    expected = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    copy_checked(expected, state, what="quantized checkpoint")
    warm_caches(model)
