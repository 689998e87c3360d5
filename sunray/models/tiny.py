"""Tiny random models of every supported family, saved as HF checkpoints (nothing is downloaded): for tests, and for
benchmarks that need a model directory without a checkpoint (`experiments.bench_worker`).

    path = make_tiny_model_dir(tmp_path, "qwen3", seed=1)   # config.json + model.safetensors + tokenizer
    lm = load_model(path)                                    # our Decoder

Weights are N(0, 0.02) from a seeded generator and every RMSNorm weight is perturbed away from 1, so that a wrong
norm, bias, multiplier or rope would show in the logits. The tokenizer is byte-level BPE over the 256 bytes (any
text round-trips) plus a few special tokens and a ChatML-like chat template, padded to the config's vocab_size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

# The families of sunray.models.config.SUPPORTED_MODEL_TYPES, plus variants that switch on the rarer features.
FAMILIES = ("llama", "qwen2", "qwen3", "hyperclovax")
VARIANTS = (*FAMILIES, "llama3rope")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|endofturn|>", "<|stop|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NUM_BASE_TOKENS = len(SPECIAL_TOKENS) + 256  # the smallest vocab_size make_tokenizer accepts

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    bos_token_id=None,
    eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
    pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
)

# Per variant: the model_type and the fields that differ from _COMMON.
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "llama",
        dict(
            vocab_size=320,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "llama3rope": (
        "llama",
        dict(
            vocab_size=320,
            num_hidden_layers=3,
            tie_word_embeddings=False,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,  # with head_dim 16 this puts frequencies in all three llama3 bands
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2": (
        "qwen2",
        dict(
            vocab_size=384,
            tie_word_embeddings=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "qwen3": (
        "qwen3",
        # Tied embeddings, and head_dim (32) != hidden_size / num_heads (16), as Qwen3 allows.
        dict(
            vocab_size=352,
            head_dim=32,
            tie_word_embeddings=True,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "hyperclovax": (
        "hyperclovax",
        dict(
            vocab_size=416,
            num_hidden_layers=3,
            tie_word_embeddings=False,
            embedding_multiplier=3.0,
            attention_multiplier=0.15,  # != 16 ** -0.5
            residual_multiplier=0.6,
            logits_scaling=1.7,
            use_post_norm=True,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        ),
    ),
}


def tiny_config(family: str, **overrides: Any):
    """A tiny transformers config of `family` (a name of VARIANTS); `overrides` replace any field."""
    if family not in _VARIANTS:
        raise ValueError(f"unknown tiny model family {family!r}; known: {', '.join(_VARIANTS)}")
    model_type, fields = _VARIANTS[family]
    kwargs = {**_COMMON, **fields, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE (no merges) over the 256 bytes, the special tokens first, padded with unused tokens."""
    if vocab_size < NUM_BASE_TOKENS:
        raise ValueError(f"vocab_size must be at least {NUM_BASE_TOKENS}, got {vocab_size}")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*SPECIAL_TOKENS, *alphabet]
    tokens += [f"<|extra_{i}|>" for i in range(vocab_size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _perturbed_init(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """N(0, std) everywhere, norm weights 1 + N(0, 0.2): a norm that is skipped or misplaced changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def make_hf_model(family: str, seed: int = 0, **overrides: Any):
    """A seeded float32 transformers model of `family` with eager attention, in eval mode."""
    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _perturbed_init(model, seed)
    return model.eval()


def make_tiny_model_dir(
    tmp_path: str | Path, family: str, seed: int = 0, name: str | None = None, **overrides: Any
) -> Path:
    """Save a tiny model of `family` (weights + config + tokenizer) to `tmp_path / name` and return the directory."""
    model = make_hf_model(family, seed, **overrides)
    path = Path(tmp_path) / (name or f"{family}-s{seed}")
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path
