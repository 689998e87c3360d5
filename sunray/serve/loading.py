"""Loading modules inside serving processes: threads, device, dummy shapes."""

from __future__ import annotations

from sunray.models.loader import LoadedModel, load_model
from sunray.serve.config import DecodeArgs


def load_for_serving(spec: str, args: DecodeArgs) -> LoadedModel:
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.dummy_shape:
        from sunray.models.loader import load_tokenizer, resolve_model_dir
        from sunray.models.presets import dummy_model

        lm = dummy_model(args.dummy_shape, device=args.device, dtype=args.torch_dtype())
        # Random weights still need text in and out: borrow a tokenizer (its ids fit any larger vocabulary).
        lm.tokenizer = load_tokenizer(resolve_model_dir(args.tokenizer))
        return lm
    return load_model(spec, device=args.device, dtype=args.torch_dtype())
