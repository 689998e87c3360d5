"""What serving loads (sunray.serve.loading, no Ray): a dummy decode module quantized for QSUN, the prefill
modules carrying its fingerprint, and the refusals of a config that cannot run."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sunray.models.quant.linear import QuantLinear
from sunray.serve.config import DecodeArgs
from sunray.serve.loading import load_for_serving

pytestmark = pytest.mark.usefixtures("single_thread")


def test_dummy_quantization_quantizes_decode_and_names_it_in_prefill():
    args = DecodeArgs(dummy_shape="tiny-llama", dummy_quantization="int4-g32", device="cpu")
    decode = load_for_serving("default", args, "decode")
    prefill = load_for_serving("default", args, "prefill")
    assert any(isinstance(m, QuantLinear) for m in decode.model.modules())
    assert not any(isinstance(m, QuantLinear) for m in prefill.model.modules())
    assert decode.fingerprint.quantization == "int4-g32" == prefill.fingerprint.quantization
    assert decode.fingerprint == prefill.fingerprint  # the decode worker accepts the prefill replicas' KV


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"dummy_quantization": "int4-g128"}, "goes with dummy_shape"),
        ({"dummy_shape": "tiny-llama", "dummy_quantization": "int3"}, "int3"),
        ({"dummy_shape": "tiny-llama", "dummy_quantization": "int8", "device": "cuda"}, "no fast path"),
    ],
)
def test_config_refuses_what_cannot_run(kwargs, words):
    with pytest.raises(ValidationError, match=words):
        DecodeArgs(**kwargs)


def test_a_dummy_model_only_decodes_ids_its_borrowed_tokenizer_has():
    """The 8B shape has 128,256 ids and the SmolLM2 tokenizer 49,152: ids beyond the tokenizer decode to no text,
    which held a stream's first text back (and inflated a client's TTFT). Their LM-head rows are zeroed."""
    import torch

    from sunray.models.presets import dummy_model
    from sunray.models.tiny import make_tokenizer
    from sunray.serve.loading import limit_to_tokenizer

    lm = dummy_model("tiny-llama", seed=0)
    lm.tokenizer = make_tokenizer(320)
    limit_to_tokenizer(lm)
    hidden = torch.randn(256, lm.model.lm_head.in_features)  # any last hidden states
    with torch.no_grad():
        logits = lm.model.lm_head(hidden)
    assert logits.shape[-1] == 49152 and int(logits.argmax(-1).max()) < 320


def test_decode_steps_overlap_by_default_on_cuda_only():
    from sunray.serve.config import EngineArgs

    assert EngineArgs().engine_config("cuda:0").overlap_steps  # the host's work hidden under the GPU's
    assert not EngineArgs().engine_config("cpu").overlap_steps  # a CPU runs each pass as it is launched
    assert not EngineArgs(overlap_steps=False).engine_config("cuda").overlap_steps
    assert EngineArgs(overlap_steps=True).engine_config("cpu").overlap_steps
