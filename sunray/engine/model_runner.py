"""Turns a list of sequences into one forward pass: builds the flat inputs and the step context, runs the model,
returns the logits of each sequence's last position.

On CUDA, decode inputs live in persistent device buffers filled by two pinned host-to-device copies per step (the
per-sequence metadata and all block tables as one flat array, expanded on the device), and a decode step replays a CUDA graph captured for the smallest batch-size bucket (1, 2, 4, ..., 256) that holds the
batch; the rows past the batch are padding (slot -1: no KV written; context 0: nothing read). One replay launches
every kernel of every layer, so a step costs the GPU's time, not Python's. On the CPU everything runs eagerly, the
reference path.
"""

from __future__ import annotations

import array
import dataclasses
import itertools

import torch

from sunray.engine.attention import AttentionBackend, StepContext
from sunray.engine.kv_cache import PagedKVCache
from sunray.engine.sequence import Sequence
from sunray.models import fused_ops
from sunray.models.decoder import Decoder

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def kv_cache_bytes_for_free_memory(
    device: torch.device | str, utilization: float = 0.9, reserve_bytes: int = 1 << 30
) -> int:
    """Bytes of KV cache that fit on `device` now: what is free, less (1 - utilization) of the card, less a reserve
    for activations and CUDA graphs. Measure after the weights are loaded (and ideally after a warm-up step)."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return max(0, int(free - (1.0 - utilization) * total - reserve_bytes))


@dataclasses.dataclass
class PreviousTokens:
    """The tokens a step sampled that the host has not read yet (overlapped stepping): `tokens` [rows of that
    step] on the device, and for each sequence of the next batch its row there (-1: not in it)."""

    tokens: torch.Tensor
    sources: list[int]


class _DecodeInputs:
    """Persistent device buffers of a decode step (what a captured graph reads) and their pinned host staging.

    `meta` rows: token ids, positions, slots, context lengths, the offsets of each sequence's block table in
    `flat`, the block tables of the batch concatenated (so one flat array travels instead of a padded 2-D table),
    and the row of the previous step whose sampled token is this row's input (-1: the host's `last_token`).
    A kernel at the start of the step expands them into `tables` [rows, width], which the attention reads."""

    IDS, POSITIONS, SLOTS, LENS, STARTS, SOURCES = range(6)
    ROWS = 6

    def __init__(self, max_batch: int, width: int, device: torch.device) -> None:
        self.max_batch, self.width = max_batch, width
        self.meta = torch.zeros((self.ROWS, max_batch + 1), dtype=torch.int64, device=device)
        self.flat = torch.zeros((max_batch * width,), dtype=torch.int32, device=device)
        self.tables = torch.zeros((max_batch, width), dtype=torch.int32, device=device)
        self.meta_host = torch.zeros((self.ROWS, max_batch + 1), dtype=torch.int64).pin_memory()
        self.flat_host = torch.zeros((max_batch * width,), dtype=torch.int32).pin_memory()
        self.copied: torch.cuda.Event | None = None

    def fill(
        self, seqs: list[Sequence], rows: int, block_size: int, prev: PreviousTokens | None = None
    ) -> int:
        """Write the batch (padded to `rows`) into the device buffers; returns the block-table width it needs.
        With `prev`, a sequence whose newest token is still on the device (sampled by the step before, not yet
        seen by the host) reads it from there, one position further on."""
        if self.copied is not None:  # the previous step's copies must have left the pinned buffers
            self.copied.synchronize()
        n = len(seqs)
        sources = prev.sources if prev is not None else [-1] * n
        lens = [s.num_tokens + (src >= 0) for s, src in zip(seqs, sources)]
        positions = [c - 1 for c in lens]
        tables = [s.block_table for s in seqs]
        slots = [t[p // block_size] * block_size + p % block_size for t, p in zip(tables, positions)]
        sizes = [len(t) for t in tables]
        starts = list(itertools.accumulate(sizes, initial=0))
        total = starts[-1]
        ids = [s.last_token for s in seqs]
        # one array for the six rows (all but the starts get a dummy last entry, overwritten by padding if any)
        meta = array.array(
            "q",
            itertools.chain(ids, (0,), positions, (0,), slots, (-1,), lens, (0,), starts, sources, (-1,)),
        )
        self.meta_host[:, : n + 1].copy_(torch.frombuffer(meta, dtype=torch.int64).view(self.ROWS, n + 1))
        if rows > n:
            self.meta_host[: self.STARTS, n:rows] = 0
            self.meta_host[self.SLOTS, n:rows] = -1
            self.meta_host[self.STARTS, n + 1 : rows + 1] = total
            self.meta_host[self.SOURCES, n:rows] = -1
        flat = array.array("i", itertools.chain.from_iterable(tables))
        self.flat_host[:total].copy_(torch.frombuffer(flat, dtype=torch.int32))
        self.meta.copy_(self.meta_host, non_blocking=True)
        self.flat[:total].copy_(self.flat_host[:total], non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        if prev is not None:
            ids_dev, src = self.meta[self.IDS, :n], self.meta[self.SOURCES, :n]
            torch.where(src >= 0, prev.tokens.index_select(0, src.clamp(min=0)), ids_dev, out=ids_dev)
        return max(sizes)

    def pad(self, rows: int) -> None:
        """Padded rows only: what a graph is warmed up and captured with (writes no KV, reads none)."""
        self.meta[:, : rows + 1] = 0
        self.meta[self.SLOTS, :rows] = -1

    def expand_tables(self, rows: int) -> None:
        from sunray.engine.triton_attention import expand_block_tables

        expand_block_tables(self.flat, self.meta[self.STARTS], self.tables[:rows])


class ModelRunner:
    def __init__(
        self,
        model: Decoder,
        kv_cache: PagedKVCache,
        backend: AttentionBackend,
        *,
        cuda_graphs: bool | None = None,
        fast_path: bool | None = None,
        graph_batch_sizes: tuple[int, ...] = GRAPH_BATCH_SIZES,
    ) -> None:
        """cuda_graphs: None turns them on where the device is CUDA and the backend can be captured.
        fast_path: the decoder's fused weights and ops (`Decoder.fuse_weights`); None: on for CUDA, untouched else."""
        self.model, self.kv_cache, self.backend = model, kv_cache, backend
        self.device = kv_cache.device
        on_gpu = self.device.type == "cuda"
        if fast_path is None:
            fast_path = True if on_gpu else None
        if fast_path and hasattr(model, "fuse_weights"):
            model.fuse_weights()
        elif fast_path is False and hasattr(model, "fast_path"):
            model.fast_path = False
        if cuda_graphs is None:
            cuda_graphs = on_gpu and getattr(backend, "supports_cuda_graphs", False)
        if cuda_graphs and not on_gpu:
            raise ValueError("CUDA graphs need a CUDA device")
        self.cuda_graphs = bool(cuda_graphs)
        self.graph_batch_sizes = tuple(sorted(graph_batch_sizes))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None
        self._inputs: _DecodeInputs | None = None

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], starts: list[int]) -> torch.Tensor:
        """Run tokens [start, num_tokens) of each sequence; KV of [0, start) must already be in its blocks."""
        ids, positions, slots, query_lens = [], [], [], []
        for seq, start in zip(seqs, starts):
            end = seq.num_tokens
            ids += seq.all_token_ids()[start:end]
            positions += range(start, end)
            slots += self.kv_cache.slots(seq.block_table, start, end)
            query_lens.append(end - start)
        lens = [s.num_tokens for s in seqs]
        ctx = StepContext(
            backend=self.backend,
            kv_cache=self.kv_cache,
            is_prefill=True,
            slot_mapping=self._tensor(slots),
            context_lens=self._tensor(lens),
            block_tables=self._block_tables(seqs),
            query_lens=query_lens,
            context_lens_host=lens,
        )
        hidden = self.model(self._tensor(ids), self._tensor(positions), ctx)
        last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
        return self.model.compute_logits(hidden[last])

    # -- decode ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], prev: PreviousTokens | None = None) -> torch.Tensor:
        """One token per sequence: the newest token, whose KV is written now at position num_tokens - 1. With
        `prev`, a sequence with a source row there has one more token than the host knows of (on the device).

        On CUDA the returned logits may be a view of a graph's output buffer: use them before the next step."""
        n = len(seqs)
        if self.device.type != "cuda" or n > self.graph_batch_sizes[-1] or not fused_ops.HAS_TRITON:
            return self._decode_simple(seqs, prev)
        inputs = self._decode_inputs()
        bucket = next(b for b in self.graph_batch_sizes if b >= n) if self.cuda_graphs else None
        if bucket is None:
            width = inputs.fill(seqs, n, self.kv_cache.block_size, prev)
            inputs.expand_tables(n)
            ctx = self._decode_context(n, width)
            hidden = self.model(inputs.meta[inputs.IDS, :n], inputs.meta[inputs.POSITIONS, :n], ctx)
            return self.model.compute_logits(hidden)
        if bucket not in self._graphs:
            self._capture(bucket)
        graph, logits = self._graphs[bucket]
        inputs.fill(seqs, bucket, self.kv_cache.block_size, prev)
        graph.replay()
        return logits[:n]

    def _decode_simple(self, seqs: list[Sequence], prev: PreviousTokens | None = None) -> torch.Tensor:
        sources = prev.sources if prev is not None else [-1] * len(seqs)
        positions = [s.num_tokens - 1 + (src >= 0) for s, src in zip(seqs, sources)]
        bs = self.kv_cache.block_size
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        ctx = StepContext(
            backend=self.backend,
            kv_cache=self.kv_cache,
            is_prefill=False,
            slot_mapping=self._tensor(slots),
            context_lens=self._tensor([p + 1 for p in positions]),
            block_tables=self._block_tables(seqs),
            query_lens=[1] * len(seqs),
        )
        ids = self._tensor([s.last_token for s in seqs])
        if prev is not None:
            src = self._tensor(sources)
            ids = torch.where(src >= 0, prev.tokens.index_select(0, src.clamp(min=0)), ids)
        hidden = self.model(ids, self._tensor(positions), ctx)
        return self.model.compute_logits(hidden)

    def _decode_inputs(self) -> _DecodeInputs:
        if self._inputs is None:
            bs = self.kv_cache.block_size
            width = min(self.kv_cache.num_blocks, -(-self.model.config.max_position_embeddings // bs))
            self._inputs = _DecodeInputs(self.graph_batch_sizes[-1], width, self.device)
        return self._inputs

    def _decode_context(self, rows: int, width: int | None) -> StepContext:
        inputs = self._inputs
        return StepContext(
            backend=self.backend,
            kv_cache=self.kv_cache,
            is_prefill=False,
            slot_mapping=inputs.meta[inputs.SLOTS, :rows],
            context_lens=inputs.meta[inputs.LENS, :rows],
            block_tables=inputs.tables[:rows] if width is None else inputs.tables[:rows, :width],
            query_lens=[1] * rows,
        )

    @torch.inference_mode()
    def capture(self, batch_sizes: tuple[int, ...] | None = None) -> None:
        """Capture decode graphs now (largest first, so that the smaller ones reuse its memory) instead of at first
        use. Default: every bucket."""
        if not self.cuda_graphs:
            return
        for b in sorted(batch_sizes or self.graph_batch_sizes, reverse=True):
            if b in self.graph_batch_sizes and b not in self._graphs:
                self._capture(b)

    def _capture(self, bucket: int) -> None:
        inputs = self._decode_inputs()
        ctx = self._decode_context(bucket, None)
        ids, positions = inputs.meta[inputs.IDS, :bucket], inputs.meta[inputs.POSITIONS, :bucket]

        def run() -> torch.Tensor:
            inputs.expand_tables(bucket)
            return self.model.compute_logits(self.model(ids, positions, ctx))

        inputs.pad(bucket)
        run()  # warm-up: compiles the Triton kernels, lets cuBLAS pick its algorithms
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread (a prefill engine in the same process, say) may use the GPU meanwhile
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            logits = run()
        if self._graph_pool is None:
            self._graph_pool = graph.pool()
        self._graphs[bucket] = (graph, logits)
