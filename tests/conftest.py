"""Shared fixtures for the CPU tests: a tiny in-memory tokenizer and tiny random Llama decoders.

Everything is built in memory (nothing read from a hub or the disk) and is small enough that a whole engine test
runs in milliseconds on two cores.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Callable

import pytest
import torch

from sunray.models.config import ModelConfig
from sunray.models.decoder import Decoder
from sunray.models.loader import LoadedModel, init_dummy_weights, wrap_model

TINY_VOCAB_SIZE = 256
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "</s>", "<s>")
# ids 3..97: the printable ASCII characters; ids 98..255: two-letter tokens "aa", "ab", ... (so that a string can
# arrive split over tokens of different lengths).
_CHARS = tuple(chr(c) for c in range(32, 127))
_PAIRS = tuple("".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2))[
    : TINY_VOCAB_SIZE - len(SPECIAL_TOKENS) - len(_CHARS)
]
TINY_VOCAB: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS + _CHARS + _PAIRS)}
assert len(TINY_VOCAB) == TINY_VOCAB_SIZE


def tiny_hf_config():
    """The transformers config of the tiny Llama every engine test uses."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
    )


def build_tiny_tokenizer():
    """A character-level WordLevel tokenizer over TINY_VOCAB whose decode concatenates tokens (no spaces added)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(dict(TINY_VOCAB), unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        clean_up_tokenization_spaces=False,
    )


def tok_id(token: str) -> int:
    """The id of one token of TINY_VOCAB ("a", " ", "ab", "</s>" ...)."""
    return TINY_VOCAB[token]


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for the module (opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`).

    The tiny models gain nothing from more threads, and when other processes share the two cores, torch's thread
    pool spinning makes them about ten times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    return ModelConfig.from_hf(tiny_hf_config())


@pytest.fixture(scope="session")
def make_lm(tiny_tokenizer, tiny_model_config) -> Callable[..., LoadedModel]:
    """make_lm(seed, dtype=torch.float32): a tiny random Llama as a LoadedModel, cached per (seed, dtype).

    Different seeds give different weights, hence different base fingerprints. Tests must not modify the weights.
    """
    cache: dict[tuple[int, torch.dtype], LoadedModel] = {}

    def make(seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
        key = (seed, dtype)
        if key not in cache:
            model = Decoder(tiny_model_config)
            init_dummy_weights(model, seed)
            model = model.to(dtype).eval().requires_grad_(False)
            cache[key] = wrap_model(model, tiny_tokenizer)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_lm(make_lm) -> LoadedModel:
    """The tiny Llama with seed 0, float32."""
    return make_lm(0)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (head + a decode node) and Serve for the whole session: every serving test module
    deploys its own applications on it (tests/serving.py) and deletes them; Ray starts once."""
    from serving import start_cluster, stop_cluster

    rc = start_cluster()
    yield rc
    stop_cluster(rc)
