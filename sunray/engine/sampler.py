"""Per-request sampling: greedy, temperature, top-k, top-p and seeds, on one batch of logits.

Every row is filtered and drawn in the same few batched ops, whatever mix of parameters the batch holds: a loop
over rows (one top-k, sort, softmax and multinomial each, and a device sync per row for `int()`) cost 1.3 s a
step at batch 256 on the CPU machine and one sync per request on a GPU. A draw is an inverse transform: one
cumulative sum per row and one uniform per row, drawn on the host, so that a seeded request needs one scalar from
its own generator, not a row of noise, and gets the same uniform on every device (`sunray bench sampler` times it).
"""

from __future__ import annotations

import torch

from sunray.engine.sequence import Sequence

_GOLDEN = 0x9E3779B97F4A7C15
_HOST = torch.device("cpu")
TOP_P_CANDIDATES = 1024


def device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device` without waiting for it: to a CUDA device through pinned memory and a
    non-blocking copy (`torch.tensor(values, device=cuda)` would synchronize the stream, so the host would wait for
    the forward pass just launched)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def token_generator(seed: int, output_index: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, which output token): the same seed gives the same tokens whether a
    request was decoded alone, in a batch, or after a hand-off from prefill to decode."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * _GOLDEN + output_index + 1) % (2**63 - 1))
    return g


def filter_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: list[int], top_p: list[float]
) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), each row of float32 `logits` [rows, vocab] under its own
    parameters (`temperature` [rows] > 0 on the logits' device; top_k 0 and top_p 1.0 turn a filter off).
    Returns a filtered copy: survivors keep their scaled logits, the rest are -inf."""
    rows = logits / temperature.unsqueeze(1)
    vocab = rows.shape[1]
    ks = [k if 0 < k < vocab else 0 for k in top_k]
    if any(ks):
        # The k-th largest of each row from one top-k at the largest k; rows without a top-k keep all (kth -inf).
        kmax = max(ks)
        index = device_tensor([max(k, 1) - 1 for k in ks], torch.int64, rows.device).unsqueeze(1)
        kth = torch.topk(rows, kmax, dim=1).values.gather(1, index)
        kth = kth.masked_fill(
            device_tensor([k == 0 for k in ks], torch.bool, rows.device).unsqueeze(1), float("-inf")
        )
        rows = rows.masked_fill(rows < kth, float("-inf"))
    if any(p < 1.0 for p in top_p):
        # 2.0 for a row at top_p 1.0: it keeps everything, whatever the rounding of its cumulative sums.
        p = device_tensor([p if p < 1.0 else 2.0 for p in top_p], torch.float32, rows.device).unsqueeze(1)
        rows = _top_p(rows, p)
    return rows


def _top_p(rows: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Drop a token when the tokens ranked above it already hold p of the mass (the first always stays).

    The ranking is a top-k of TOP_P_CANDIDATES, not a sort of the vocabulary (a tenth of the time on the CPU
    machine at 49k tokens), whenever those candidates hold p of a row's mass, as they do for a trained model's
    logits at usual p; the rows where they do not (flat distributions) are sorted whole."""
    k = min(rows.shape[1], TOP_P_CANDIDATES)
    top, order = torch.topk(rows, k, dim=1)
    probs = (top - top[:, :1]).exp_() / (rows - top[:, :1]).exp().sum(dim=1, keepdim=True)
    drop = (probs.cumsum(dim=1) - probs) >= p
    keep = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, order, ~drop)
    if k < rows.shape[1]:
        # Past the candidates, a row without top-p keeps everything; a row whose candidates miss p, the sort says.
        keep |= p > 1.0
        short = ((probs.sum(dim=1, keepdim=True) < p) & (p <= 1.0)).squeeze(1)
        if bool(short.any()):
            sorted_logits, full_order = torch.sort(rows[short], dim=1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=1)
            full_drop = (sorted_probs.cumsum(dim=1) - sorted_probs) >= p[short]
            keep[short] = torch.empty_like(full_drop).scatter_(1, full_order, ~full_drop)
    return rows.masked_fill(~keep, float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """`filter_rows` for one row of float32 logits [vocab]; returns a filtered copy."""
    t = device_tensor([temperature], logits.dtype, logits.device)
    return filter_rows(logits.unsqueeze(0), t, [top_k], [top_p])[0]


def uniforms(seeds: list[int | None], output_indexes: list[int]) -> list[float]:
    """One uniform in [0, 1) per drawn row, on the host: a seeded row's from its (seed, output index) generator, so
    it is the same on every device and in every batch; an unseeded row's from the default generator."""
    fresh = torch.rand(len(seeds)).tolist()
    return [
        fresh[i] if seed is None else torch.rand(1, generator=token_generator(seed, index, _HOST)).item()
        for i, (seed, index) in enumerate(zip(seeds, output_indexes))
    ]


def draw(rows: torch.Tensor, u: list[float]) -> torch.Tensor:
    """Token ids [rows] drawn from softmax(rows) (filtered logits, -inf for the dropped) by inverse transform:
    the first token whose cumulative mass exceeds u times the row's total."""
    cdf = (rows - rows.amax(dim=1, keepdim=True)).exp_().cumsum_(dim=1)
    target = device_tensor(u, cdf.dtype, cdf.device).unsqueeze(1) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).clamp_(max=rows.shape[1] - 1)
    # u * total may round up to the total itself: that index would be past the last kept token; take the row's
    # most likely token then (a chance of about 2^-24 a draw).
    kept = rows.gather(1, picked) > float("-inf")
    return torch.where(kept, picked, rows.argmax(dim=1, keepdim=True)).squeeze(1)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per row of `logits` ([len(seqs), vocab]) under each sequence's own sampling parameters."""
    return sample_tensor(logits, seqs).tolist()


def sample_tensor(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """`sample`, leaving the tokens [len(seqs)] int64 on the logits' device: nothing waits for the device here,
    unless a row asks for top-p: then one sync a step asks whether any row's candidates fall short (and picks the
    rows to sort), so with overlapped steps the next pass is launched only after this one ends."""
    tokens = logits.argmax(-1)  # in the logits' own dtype: float32 holds bf16 exactly, so the same argmax
    drawn = [i for i, seq in enumerate(seqs) if not seq.sampling.greedy]
    if not drawn:
        return tokens
    params = [seqs[i].sampling for i in drawn]
    every_row = len(drawn) == len(seqs)
    index = None if every_row else device_tensor(drawn, torch.int64, logits.device)
    rows = (logits if every_row else logits.index_select(0, index)).float()
    temperature = device_tensor([p.temperature for p in params], torch.float32, logits.device)
    rows = filter_rows(rows, temperature, [p.top_k for p in params], [p.top_p for p in params])
    picked = draw(rows, uniforms([p.seed for p in params], [len(seqs[i].output_token_ids) for i in drawn]))
    return picked if every_row else tokens.index_copy_(0, index, picked)
