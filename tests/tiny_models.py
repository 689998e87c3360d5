"""Tiny random models for tests: the builders of `sunray.models.tiny` (nothing is downloaded), plus what only tests
need: transformers' own implementation of a saved tiny model, and a perturbed "task model" copy.

    path = make_tiny_model_dir(tmp_path, "qwen3", seed=1)   # config.json + model.safetensors + tokenizer
    lm = load_model(path)                                    # our Decoder
    hf = load_hf_model(path)                                 # transformers' own implementation, same weights
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from sunray.models.loader import MANIFEST, load_model, load_state_dict
from sunray.models.tiny import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    FAMILIES,
    NUM_BASE_TOKENS,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    VARIANTS,
    make_hf_model,
    make_tiny_model_dir,
    make_tokenizer,
    tiny_config,
)

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "FAMILIES",
    "NUM_BASE_TOKENS",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "VARIANTS",
    "load_hf_model",
    "make_hf_model",
    "make_tiny_model_dir",
    "make_tokenizer",
    "perturbed_copy",
    "tiny_config",
]


def load_hf_model(path: str | Path):
    """transformers' own implementation of a saved tiny model (float32, eager attention)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def perturbed_copy(src_dir: str | Path, dst_dir: str | Path, scale: float = 1e-3, seed: int = 0) -> Path:
    """A "task model" made from `src_dir`: the same files, every weight plus N(0, scale) noise, and a sunray.json
    manifest naming the source's fingerprint as its base (so it may prefill for the source's decode module)."""
    src, dst = Path(src_dir), Path(dst_dir)
    base_fingerprint = load_model(src).fingerprint.to_dict()
    shutil.copytree(src, dst, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    state = load_state_dict(src)
    noisy = {
        k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype).contiguous()
        for k, v in sorted(state.items())
    }
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file(noisy, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in dst.glob("*.safetensors.index.json"):  # the single file replaces any shards
        f.unlink()
    (dst / MANIFEST).write_text(json.dumps({"base_fingerprint": base_fingerprint}, indent=2))
    return dst
