"""The decoder: one implementation for Llama, Qwen2, Qwen3 and HyperCLOVA X.

Parameter names follow transformers (`model.layers.N.self_attn.q_proj.weight`, ...) so that a checkpoint loads
without renaming. The model stays `forward(input_ids, positions, ctx)` over a flat batch of tokens; where keys and
values are stored and how attention reads them is the attention backend's business (`ctx.backend`).

`Decoder.fuse_weights()` is the inference transform: q/k/v and gate/up weights move into one tensor each, and the
HF-named parameters become views into it, so names, state dict and loading stay as they were while one matmul
replaces three (or two). With it on, `forward` (without autograd) takes a fast path that also fuses the residual
adds into the norms and runs RoPE as one op (`fused_ops`: Triton on CUDA, plain torch elsewhere).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sunray.models import fused_ops
from sunray.models.attention import AttentionContext
from sunray.models.config import ModelConfig
from sunray.models.quant.linear import fuse_int4, prepare_for_inference


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for the rope types sunray supports (default, linear, llama3), as transformers computes them."""
    params = config.rope_parameters
    rope_type = params.get("rope_type", "default")
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
        old_context_len = float(params["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once in float32."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.max_positions = config.max_position_embeddings
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), rope_inv_freq(config))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q, k: [tokens, heads, head_dim]; positions: [tokens]
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _FusedLinears:
    """Several nn.Linear of one input fused into one weight (and bias): the modules' parameters become views into
    the fused tensors, so loading, `state_dict()` and parameter names are unchanged. `get()` returns the fused
    tensors only while every module still holds exactly those views (a `.to()`, a reassigned weight or a module
    swapped for a quantized one falls back to the modules).

    int4 QuantLinears fuse too, differently: `quant` (a `quant.linear.FusedInt4`) packs their integer weights concatenated
    along the output dimension, for the CUDA fast path; everywhere else the modules run one by one."""

    def __init__(self, linears: list[nn.Module]) -> None:
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._ptrs: tuple[int, ...] = ()
        self.quant = None
        if all(getattr(m, "bits", None) == 4 for m in linears):
            self.quant = fuse_int4(linears)
            return
        if not all(type(m) is nn.Linear for m in linears) or len({m.bias is None for m in linears}) != 1:
            return
        if any(m.weight.requires_grad for m in linears):
            return  # parameters being trained keep their own storage
        with torch.no_grad():
            self.weight = torch.cat([m.weight.detach() for m in linears], 0)
            self.bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears], 0)
            off = 0
            for m in linears:
                n = m.weight.shape[0]
                m.weight = nn.Parameter(self.weight[off : off + n], requires_grad=False)
                if self.bias is not None:
                    m.bias = nn.Parameter(self.bias[off : off + n], requires_grad=False)
                off += n
        self._ptrs = self._pointers(linears)

    @staticmethod
    def _pointers(linears: list[nn.Module]) -> tuple[int, ...]:
        ptrs = []
        for m in linears:
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                ptrs.append(t.data_ptr() if isinstance(t, torch.Tensor) else 0)
        return tuple(ptrs)

    def get(self, linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if self.weight is None:
            return None
        if self._pointers(linears) != self._ptrs:
            self.weight = self.bias = None  # stale (moved or replaced): let the old storage go
            return None
        return self.weight, self.bias

    def valid(self, linears: list[nn.Module]) -> bool:
        if self.quant is not None:
            return self.quant.valid(linears)
        return self.get(linears) is not None

    def __call__(self, x: torch.Tensor, linears: list[nn.Module]) -> torch.Tensor | None:
        """The fused projection of x, or None where the modules must run one by one."""
        if self.quant is not None:
            return self.quant(x, linears)
        fused = self.get(linears)
        return None if fused is None else F.linear(x, *fused)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = config.softmax_scale
        self._qkv: _FusedLinears | None = None

    def _projections(self) -> list[nn.Module]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def fuse(self) -> None:
        if self._qkv is None or not self._qkv.valid(self._projections()):
            self._qkv = _FusedLinears(self._projections())

    def forward_fast(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, ctx: AttentionContext
    ) -> torch.Tensor:
        """`forward` with one q/k/v matmul (when fused) and RoPE as one op; v stays a view of the fused output."""
        n, h, hk, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._qkv(x, self._projections()) if self._qkv is not None else None
        if qkv is not None:
            q = qkv[:, : h * d].view(n, h, d)
            k = qkv[:, h * d : (h + hk) * d].view(n, hk, d)
            v = qkv[:, (h + hk) * d :].view(n, hk, d)
        else:
            q = self.q_proj(x).view(n, h, d)
            k = self.k_proj(x).view(n, hk, d)
            v = self.v_proj(x).view(n, hk, d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = fused_ops.rope_qk(q, k, positions, rope.cos, rope.sin)
        out = ctx.backend.forward(self.layer_idx, q, k, v, self.scale, ctx)
        return self.o_proj(out.reshape(n, h * d))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, ctx: AttentionContext
    ) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(positions, q, k)
        out = ctx.backend.forward(self.layer_idx, q, k, v, self.scale, ctx)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self._gate_up: _FusedLinears | None = None

    def fuse(self) -> None:
        if self._gate_up is None or not self._gate_up.valid([self.gate_proj, self.up_proj]):
            self._gate_up = _FusedLinears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._gate_up(x, [self.gate_proj, self.up_proj]) if self._gate_up is not None else None
        if gate_up is None:
            return self.forward(x)
        return self.down_proj(fused_ops.silu_mul(gate_up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.post_norm:  # Peri-LN (HyperCLOVA X)
            self.post_norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_norm = config.post_norm
        self.residual_multiplier = config.residual_multiplier

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, ctx: AttentionContext
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), positions, rope, ctx)
        if self.post_norm:
            h = self.post_norm1(h)
        x = x + h * self.residual_multiplier if self.residual_multiplier != 1.0 else x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.post_norm:
            h = self.post_norm2(h)
        return x + h * self.residual_multiplier if self.residual_multiplier != 1.0 else x + h


class DecoderBody(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Decoder(nn.Module):
    """A causal LM. `forward` returns final hidden states; `compute_logits` maps the rows you need to logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderBody(config)
        self.rope = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fast_path = False

    def fuse_weights(self) -> Decoder:
        """The inference transform (idempotent; call it after loading and after any `.to()`): fused q/k/v and
        gate/up weights, and the fast forward path. Parameters that require grad are left unfused. A model with
        int4 QuantLinears on CUDA is packed for the int4 fast path here (`quant.linear.prepare_for_inference`: their integer
        buffers then live in host memory, the device holds the packed copy)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        if any(getattr(m, "bits", None) == 4 for m in self.modules()):  # an int4 decode module (QSUN)
            prepare_for_inference(self)  # on CUDA: pack fused and single layers, only the packed copy stays
        if torch.cuda.is_initialized() and any(p.is_cuda for p in self.parameters()):
            # The unfused copies are free now, but the caching allocator would keep them (8.5 GiB for Llama-3.1-8B)
            # from the other processes on this GPU: a decode worker beside two prefill replicas ran out of memory.
            torch.cuda.empty_cache()
        self.fast_path = True
        return self

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        if self.fast_path and not self.config.post_norm and not torch.is_grad_enabled():
            return self._forward_fast(input_ids, positions, ctx)
        x = self.model.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        for layer in self.model.layers:
            x = layer(x, positions, self.rope, ctx)
        return self.model.norm(x)

    def _forward_fast(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """The same function as the reference path with each residual add folded into the norm that follows it."""
        x = self.model.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        layers, mult = self.model.layers, self.config.residual_multiplier
        first = layers[0].input_layernorm
        h, residual = fused_ops.rms_norm(x, first.weight, first.eps), x
        for i, layer in enumerate(layers):
            a = layer.self_attn.forward_fast(h, positions, self.rope, ctx)
            norm = layer.post_attention_layernorm
            h, residual = fused_ops.add_rms_norm(a, residual, norm.weight, norm.eps, mult)
            m = layer.mlp.forward_fast(h)
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            h, residual = fused_ops.add_rms_norm(m, residual, norm.weight, norm.eps, mult)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.config.logits_scaling != 1.0:
            logits = logits * self.config.logits_scaling
        return logits
