"""Named model shapes for benchmarks with dummy weights (no checkpoint needed)."""

from __future__ import annotations

import dataclasses

import torch

from sunray.models.config import ModelConfig
from sunray.models.decoder import Decoder
from sunray.models.loader import LoadedModel, init_dummy_weights, wrap_model

SHAPES: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        eos_token_ids=(128001, 128008, 128009),
        bos_token_id=128000,
    ),
    # Tests and dry runs: SmolLM2's vocabulary (so its tokenizer fits) on a decoder of two small layers.
    "tiny-llama": ModelConfig(
        model_type="llama",
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_ids=(2,),
        bos_token_id=1,
    ),
    "smollm2-135m": ModelConfig(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        eos_token_ids=(2,),
        bos_token_id=1,
    ),
}


def dummy_model(
    shape: str | ModelConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> LoadedModel:
    """A model of `shape` (a SHAPES name or a ModelConfig) with random weights, built directly on `device` in `dtype`
    (default: bf16 on CUDA, float32 elsewhere). Every parameter is allocated once, in its final dtype: building in
    float32 and casting would peak at 48 GB for the 8B shape, and the caching allocator would keep the freed float32
    storage (a serving replica held 31.7 GB for a 16 GB model that way)."""
    if isinstance(shape, ModelConfig):
        config = shape
    elif shape in SHAPES:
        config = SHAPES[shape]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Decoder(config)
    finally:
        torch.set_default_dtype(before)
    model = model.to(dtype)  # the RoPE tables, made in float32, follow the weights
    init_dummy_weights(model, seed)
    model.eval().requires_grad_(False)
    lm = wrap_model(model, tokenizer=None)
    # Named by its recipe, not by its values: on CUDA the random values depend on how many SMs the process sees
    # (torch's generator kernels size their grid by it), so a decode worker limited by CUDA MPS
    # (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) draws other weights than an unlimited prefill replica, and a hash of the
    # values would refuse their pairing. Dummy weights are for speed only: any two of one shape and seed pair.
    lm.fingerprint = dataclasses.replace(lm.fingerprint, weights=dummy_weights_id(seed))
    return lm


def dummy_weights_id(seed: int) -> str:
    """The weights part of a dummy model's fingerprint."""
    return f"dummy-seed-{seed}"


def quantize_dummy(lm: LoadedModel, scheme: str) -> dict:
    """Quantize a dummy model's decoder layers in place with round-to-nearest (no AWQ: random weights, speed
    only), pack them for the fast path where there is one, and mark its fingerprint with the scheme, as a QSUN
    decode module's would be. On the GPU this runs there (seconds for 8B); nothing goes through the host but the
    packed layers' integer buffers, which move to host memory once packed. Returns timings and counts."""
    import time

    from sunray.models.quant.formats import QuantSpec
    from sunray.models.quant.linear import prepare_for_inference, replace_linears

    spec = QuantSpec.parse(scheme, awq=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        n = replace_linears(lm.model, spec)
    cuda = lm.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(lm.device)
    t1 = time.perf_counter()
    info = {"scheme": spec.name, "num_quantized": n, "quantize_s": round(t1 - t0, 2)}
    if cuda:
        lm.model.fuse_weights()  # fused q/k/v and gate/up, packed (drops the bf16 fused tensors of an earlier fuse)
        info.update(prepare_for_inference(lm.model, lm.device))
        torch.cuda.synchronize(lm.device)
        info["pack_s"] = round(time.perf_counter() - t1, 2)
        torch.cuda.empty_cache()
        info["allocated_GiB"] = round(torch.cuda.memory_allocated(lm.device) / 2**30, 2)
    lm.fingerprint = quantized_fingerprint(lm.fingerprint, scheme)
    return info


def quantized_fingerprint(fingerprint, scheme: str):
    """The fingerprint of `fingerprint`'s base quantized with `scheme`: what a prefill module trained against that
    decode module names as its base."""
    import dataclasses

    from sunray.models.quant.formats import QuantSpec

    return dataclasses.replace(fingerprint, quantization=QuantSpec.parse(scheme, awq=False).name)
