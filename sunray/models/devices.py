"""Where, and in what dtype, a command loads its models: the `--device` / `--dtype` flags that the `sunray` commands
share (`sunray.cli` and the commands other layers register, such as `sunray eval`)."""

from __future__ import annotations

import argparse

import torch

# --dtype choices; None (auto) lets the loader choose: bfloat16 on GPU, float32 on CPU (loader.default_dtype).
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="weights and KV dtype (auto: bfloat16 on GPU, float32 on CPU)",
    )


def device_and_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype | None]:
    """The device (`--device`, else cuda when available, else cpu) and dtype (None: auto) that `args` ask for."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, DTYPES[args.dtype]
