"""AWQ (Lin et al., 2023) calibration of a decode module before int4 (or int8) quantization, and `quantize_model`.

Per input channel scales s = mean|x|^alpha, alpha searched on a grid per layer group to minimize the error of the
group's outputs on calibration activations, are folded into the preceding RMSNorm (q/k/v, gate/up) or linear layer
(down; o when there is one KV head per query head), so the float model computes the same function; then (int4)
each weight is clipped to the per-group range that minimizes output error. Layers run one at a time over the
calibration prompts through the dense attention backend (`sunray.models.dense_attention`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch
from torch import nn

from sunray.models.dense_attention import TrainContext, positions
from sunray.models.quant.formats import TARGETS, QuantSpec, fake_quantize, split_groups
from sunray.models.quant.linear import replace_linears

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AWQConfig:
    grid: int = 20  # alphas 0, 1/grid, ..., 1
    max_tokens: int = 4096  # calibration rows used in the scale search
    clip: bool = True  # search a per-group clipping range too
    clip_tokens: int = 512
    clip_grid: int = 20
    clip_max_shrink: float = 0.5


def _sample_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, n, device=x.device).round().long()
    return x[idx]


def _search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec, grid: int
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale (and its alpha) that minimizes the quantized outputs' squared error."""
    x = x.float()
    x_mean = x.abs().mean(0)
    ref = [x @ w.float().t() for w in weights]
    best, best_s, best_alpha = math.inf, torch.ones_like(x_mean), 0.0
    for i in range(grid + 1):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, r in zip(weights, ref):
            wq = fake_quantize(w.float() * s[None, :], spec) / s[None, :]
            err += float((x @ wq.t() - r).pow(2).mean())
        if err < best:
            best, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha


@torch.no_grad()
def _search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, cfg: AWQConfig) -> torch.Tensor:
    """w clamped, per output row and input group, to the range that minimizes that group's output error (AWQ)."""
    g = spec.group_size
    wg, k = split_groups(w.float(), g)  # [out, ng, g]
    xg, _ = split_groups(_sample_rows(x.float(), cfg.clip_tokens), g)  # [n, ng, g]
    out_rows = wg.shape[0]
    best_max = wg.abs().amax(-1, keepdim=True).clone()  # [out, ng, 1]
    batch = max(1, (64 << 20) // max(1, xg.shape[0] * xg.shape[1] * 4))
    for start in range(0, out_rows, batch):
        wb = wg[start : start + batch]  # [ob, ng, g]
        ref = torch.einsum("nkg,okg->okn", xg, wb)  # [ob, ng, n]: each group's share of each output
        org_max = wb.abs().amax(-1, keepdim=True)
        best_err = torch.full(org_max.shape, math.inf, device=w.device)
        for i in range(int(cfg.clip_max_shrink * cfg.clip_grid)):
            max_val = org_max * (1 - i / cfg.clip_grid)
            cur = torch.maximum(torch.minimum(wb, max_val), -max_val)
            q = fake_quantize(cur.reshape(cur.shape[0], -1), spec).view_as(cur)
            err = (torch.einsum("nkg,okg->okn", xg, q) - ref).pow(2).mean(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max[start : start + batch] = torch.where(better, max_val, best_max[start : start + batch])
    clipped = torch.maximum(torch.minimum(wg, best_max), -best_max)
    return clipped.reshape(out_rows, -1)[:, :k].to(w.dtype)


@torch.no_grad()
def awq_transform(
    model: nn.Module, calib_token_ids: list[list[int]], spec: QuantSpec, cfg: AWQConfig | None = None
) -> dict[str, Any]:
    """Apply AWQ scales (and, for int4, clipping) to `model` in place, layer by layer, from calibration prompts.

    Scales are folded into the preceding op, so the fp model computes the same function afterwards; clipping
    changes the weights only within what quantization would lose anyway. Returns the chosen alphas per layer group.
    """
    cfg = cfg or AWQConfig()
    if not calib_token_ids:
        raise ValueError("AWQ needs calibration prompts")
    device = next(model.parameters()).device
    b, length = len(calib_token_ids), max(len(t) for t in calib_token_ids)
    ids = torch.zeros(b, length, dtype=torch.long, device=device)
    for i, t in enumerate(calib_token_ids):
        ids[i, : len(t)] = torch.tensor(t, device=device)
    lens = torch.tensor([len(t) for t in calib_token_ids], device=device)
    valid = (torch.arange(length, device=device)[None, :] < lens[:, None]).reshape(-1)
    pos = positions(b, length, limit=model.config.max_position_embeddings)
    x = model.model.embed_tokens(ids.reshape(-1))
    if model.config.embedding_multiplier != 1.0:
        x = x * model.config.embedding_multiplier
    # v -> o folds only without grouped-query attention.
    mha = model.config.num_heads == model.config.num_kv_heads
    report: dict[str, Any] = {"alphas": {}, "calibration_prompts": b, "calibration_tokens": int(valid.sum())}
    for li, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        feats: dict[str, torch.Tensor] = {}

        def grab(key, feats=feats):
            def hook(_mod, args):
                feats[key] = _sample_rows(args[0].detach()[valid], cfg.max_tokens).float()

            return hook

        hooks = [
            attn.q_proj.register_forward_pre_hook(grab("qkv")),
            attn.o_proj.register_forward_pre_hook(grab("o")),
            mlp.gate_proj.register_forward_pre_hook(grab("gate_up")),
            mlp.down_proj.register_forward_pre_hook(grab("down")),
        ]
        try:
            # The fp layer: next layer's input.
            x_next = layer(x, pos, model.rope, TrainContext.causal(b, length))
        finally:
            for h in hooks:
                h.remove()
        # (group, linears that read the input, what produces the input: a norm or a linear's output rows)
        groups = [
            ("qkv", [attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm),
            ("gate_up", [mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm),
            ("down", [mlp.down_proj], mlp.up_proj),
        ]
        if mha:
            groups.append(("o", [attn.o_proj], attn.v_proj))
        for key, linears, prev in groups:
            s, alpha = _search_scale(feats[key], [m.weight for m in linears], spec, cfg.grid)
            for m in linears:
                m.weight.mul_(s[None, :].to(m.weight.dtype))
            if isinstance(prev, nn.Linear):
                prev.weight.div_(s[:, None].to(prev.weight.dtype))
                if prev.bias is not None:
                    prev.bias.div_(s.to(prev.bias.dtype))
            else:  # an RMSNorm: its weight scales its output channels
                prev.weight.div_(s.to(prev.weight.dtype))
            feats[key] = feats[key] / s[None, :]  # the input as the scaled linears see it
            report["alphas"][f"{li}.{key}"] = alpha
        if cfg.clip and spec.bits == 4:
            # q/k stay unclipped (attention scores are sensitive to them), as in AWQ.
            for m, key in (
                (attn.v_proj, "qkv"),
                (attn.o_proj, "o"),
                (mlp.gate_proj, "gate_up"),
                (mlp.up_proj, "gate_up"),
                (mlp.down_proj, "down"),
            ):
                m.weight.copy_(_search_clip(m.weight, feats[key], spec, cfg))
        x = x_next
        log.info("AWQ: layer %d/%d", li + 1, len(model.model.layers))
    return report


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    calib_token_ids: list[list[int]] | None = None,
    awq: AWQConfig | None = None,
) -> dict[str, Any]:
    """Quantize `model` in place (AWQ first when the spec asks for it). Returns the manifest's `quantization`."""
    info: dict[str, Any] = {**spec.to_dict(), "method": "rtn", "modules": list(TARGETS)}
    if spec.awq:
        if not calib_token_ids:
            raise ValueError(f"{spec.name} with AWQ needs calibration prompts (or turn AWQ off)")
        t0 = time.perf_counter()
        info["awq_search"] = awq_transform(model, calib_token_ids, spec, awq)
        info["awq_search"]["seconds"] = round(time.perf_counter() - t0, 1)
        info["method"] = "awq"
    info["num_quantized"] = replace_linears(model, spec)
    return info
