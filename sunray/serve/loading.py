"""Loading modules inside serving processes: threads, device, dummy shapes (and their quantization)."""

from __future__ import annotations

from typing import Literal

from sunray.models.loader import LoadedModel, load_model
from sunray.serve.config import DecodeArgs


def load_for_serving(spec: str, args: DecodeArgs, role: Literal["prefill", "decode"]) -> LoadedModel:
    """The module a prefill replica (`role` prefill) or a decode worker (decode) serves. With `dummy_shape` and
    `dummy_quantization`, the decode module is quantized in place (before the worker captures its graphs) and the
    prefill modules carry the fingerprint of that quantized base, as QSUN-trained modules would."""
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.dummy_shape:
        from sunray.models.loader import load_tokenizer, resolve_model_dir
        from sunray.models.presets import dummy_model, quantize_dummy, quantized_fingerprint

        lm = dummy_model(args.dummy_shape, device=args.device, dtype=args.torch_dtype())
        # Random weights still need text in and out: borrow a tokenizer (its ids fit any larger vocabulary).
        lm.tokenizer = load_tokenizer(resolve_model_dir(args.tokenizer))
        limit_to_tokenizer(lm)
        if args.dummy_quantization and role == "decode":
            quantize_dummy(lm, args.dummy_quantization)
        elif args.dummy_quantization:
            lm.fingerprint = quantized_fingerprint(lm.fingerprint, args.dummy_quantization)
    else:
        lm = load_model(spec, device=args.device, dtype=args.torch_dtype())
    if role == "decode" and lm.device.type == "cuda" and lm.fingerprint.quantization == "int8":
        raise ValueError(
            "an int8 decode module has no fast path on CUDA (it would run the reference dequantize-then-matmul, "
            "no faster than bf16): serve an int4 one (sunray quantize --scheme int4 --group-size 128) or bf16"
        )
    return lm


def limit_to_tokenizer(lm: LoadedModel) -> None:
    """Zero the LM-head rows of the ids the borrowed tokenizer does not have. Their logits are then 0, below the
    largest of the random logits of the real ids, so greedy decoding picks only ids with text. Without this the
    8B shape (128,256 ids) with the SmolLM2 tokenizer (49,152) drew mostly ids that decode to nothing: a streamed
    request sent its first text several tokens (one stream_interval chunk or more) after its first token, and a
    client's TTFT, which is the first text, measured that wait instead of the server's."""
    import torch

    n = len(lm.tokenizer)
    head = lm.model.lm_head.weight
    if n < head.shape[0]:
        with torch.no_grad():
            head[n:].zero_()
