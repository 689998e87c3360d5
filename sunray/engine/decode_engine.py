"""The decode side of SUN: one frozen decode module, continuous batching over requests of every task model.

A request arrives as a KV hand-off (prompt KV written by some prefill module, plus the first token). Each step
admits waiting requests while KV blocks last, decodes one token for every running request, and retires finished
ones. When the pool runs dry mid-generation the newest request is swapped out (its KV copied to host memory) and
re-admitted later, so nobody's KV is ever overwritten and nothing is recomputed.

With `EngineConfig.overlap_steps` a step launches the next forward pass before it reads the tokens of the one
before (they stay on the device and feed the new pass directly), so the host's share of a step (appending,
stop checks, detokenization, the outputs) runs while the device computes. A request that stops on a token is then
computed one step too many and that token dropped; one that ends by length is left out of the pass that would
overrun. The tokens are the same as without it (tests/test_decode_overlap.py).
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from sunray.engine.attention import get_backend
from sunray.engine.block_manager import BlockManager
from sunray.engine.config import EngineConfig
from sunray.engine.handoff import KVHandoff, KVHandoffError, dtype_name
from sunray.engine.kv_cache import PagedKVCache
from sunray.engine.model_runner import ModelRunner, PreviousTokens
from sunray.engine.output_processor import OutputProcessor
from sunray.engine.sampler import device_tensor, sample_tensor
from sunray.engine.sequence import FinishReason, RequestOutput, Sequence, Status
from sunray.models.loader import LoadedModel


class KVCapacityError(RuntimeError):
    """A request that could never fit this worker's KV pool, even alone."""


@dataclasses.dataclass
class _Waiting:
    seq: Sequence
    kv: torch.Tensor  # [layers, 2, tokens, kv_heads, head_dim], on the host or the device


@dataclasses.dataclass
class _Launched:
    """A decode pass whose tokens the host has not read yet."""

    batch: list[Sequence]
    tokens: torch.Tensor  # [len(batch)] on the device: what the next pass reads
    host: torch.Tensor  # the same, copied to the host as the device gets there
    ready: torch.cuda.Event | None  # recorded after that copy (CUDA); None: `host` is already valid


@dataclasses.dataclass(frozen=True)
class DecodeStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    num_preemptions: int


class DecodeEngine:
    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None) -> None:
        self.lm = lm
        self.config = config or EngineConfig()
        cfg = self.config
        self.max_model_len = cfg.context_length(lm.config)
        num_blocks = cfg.num_kv_blocks or PagedKVCache.num_blocks_for_budget(
            lm.config, cfg.block_size, lm.dtype, cfg.kv_cache_bytes
        )
        self.kv_cache = PagedKVCache(lm.config, num_blocks, cfg.block_size, lm.dtype, lm.device)
        self.blocks = BlockManager(num_blocks, cfg.block_size)
        self.runner = ModelRunner(lm.model, self.kv_cache, get_backend(cfg.attention_backend, lm.device))
        self.outputs = OutputProcessor.for_model(lm, self.max_model_len)
        self.waiting: collections.deque[_Waiting] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._aborted: list[RequestOutput] = []
        self._launched: _Launched | None = None  # overlap_steps: the pass in flight

    def capture_graphs(self) -> None:
        """On CUDA: capture the decode graphs of every batch bucket up to max_num_seqs now (and compile the
        kernels), so that the first requests at each batch size do not pay for it. Nothing elsewhere."""
        sizes = self.runner.graph_batch_sizes
        top = next((b for b in sizes if b >= self.config.max_num_seqs), sizes[-1])
        self.runner.capture(tuple(b for b in sizes if b <= top))

    # -- admission ---------------------------------------------------------------------------------------------
    def check(self, handoff: KVHandoff) -> None:
        """Raise KVHandoffError unless this decode module can continue from `handoff`'s KV."""
        mine = self.lm.fingerprint
        if handoff.fingerprint != mine:
            diff = "; ".join(handoff.fingerprint.differences(mine))
            raise KVHandoffError(
                f"request {handoff.request_id} (model {handoff.model!r}): its KV was written for base "
                f"{handoff.fingerprint.digest}, this decode module is {mine.digest} ({diff})"
            )
        c = self.lm.config
        expected = (c.num_layers, 2, handoff.num_kv_tokens, c.num_kv_heads, c.head_dim)
        if tuple(handoff.kv.shape) != expected:
            raise KVHandoffError(
                f"request {handoff.request_id}: KV shape {tuple(handoff.kv.shape)} != {expected}"
            )
        if handoff.kv.dtype != self.lm.dtype:
            raise KVHandoffError(
                f"request {handoff.request_id}: KV dtype {dtype_name(handoff.kv.dtype)} != "
                f"decode module dtype {dtype_name(self.lm.dtype)}"
            )
        if self.has_request(handoff.request_id):
            raise KVHandoffError(f"request id {handoff.request_id!r} is already in this decode engine")
        self.check_capacity(handoff.request_id, len(handoff.prompt_token_ids), handoff.sampling.max_tokens)

    def check_capacity(self, request_id: str, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise KVCapacityError if a request of this size could not fit this worker's KV pool even alone."""
        need = self.blocks.blocks_needed(min(num_prompt_tokens + max_tokens, self.max_model_len))
        if need > self.blocks.num_blocks:
            raise KVCapacityError(
                f"request {request_id} may need {need} KV blocks; this worker has {self.blocks.num_blocks}"
            )

    def add(self, handoff: KVHandoff) -> None:
        self.check(handoff)
        self.waiting.append(_Waiting(handoff.to_sequence(), handoff.kv))

    def has_request(self, request_id: str) -> bool:
        return any(s.request_id == request_id for s in self.running) or any(
            w.seq.request_id == request_id for w in self.waiting
        )

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV now. True if it was here."""
        for w in self.waiting:
            if w.seq.request_id == request_id:
                self.waiting.remove(w)
                self._finish_aborted(w.seq)
                return True
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self.blocks.free(seq.block_table)
                self._finish_aborted(seq)
                return True
        return False

    def _finish_aborted(self, seq: Sequence) -> None:
        self.outputs.finish(seq, FinishReason.ABORT)
        self._aborted.append(self.outputs.take_output(seq))

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            w = self.waiting[0]
            # Room for the KV plus the slot of the token this step writes.
            if not self.blocks.can_allocate(w.seq.num_tokens):
                break
            self.waiting.popleft()
            w.seq.block_table = self.blocks.allocate(w.seq.num_tokens)
            slots = self.kv_cache.slots(w.seq.block_table, 0, w.kv.shape[2])
            # Not torch.tensor(slots, device=...): on CUDA that waits for the pass in flight (overlap_steps).
            self.kv_cache.write(device_tensor(slots, torch.int64, self.kv_cache.device), w.kv)
            w.seq.status = Status.RUNNING
            self.running.append(w.seq)

    def _preempt(self, seq: Sequence) -> None:
        """Swap `seq` out: copy its KV to the host, free its blocks, put it first in line."""
        slots = torch.tensor(
            self.kv_cache.slots(seq.block_table, 0, seq.num_tokens - 1), device=self.kv_cache.device
        )
        kv = self.kv_cache.read(slots).cpu()
        self.blocks.free(seq.block_table)
        self.running.remove(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(_Waiting(seq, kv))
        self.num_preemptions += 1

    # -- the step ----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit, decode one token for every running request, retire the finished. Returns this step's outputs:
        with overlap_steps, those of the pass launched by the call before (this call's pass is then in flight)."""
        outputs, self._aborted = self._aborted, []
        self._admit()
        launched, self._launched = self._launched, None
        batch = self._next_batch(launched)
        if launched is not None and not self._grow(batch, launched):
            # The pool ran dry: settle the pass in flight first (finished requests free their blocks), then make
            # room as a step without overlap would.
            outputs += self._settle(launched)
            launched = None
            batch = self._next_batch(None)
        if launched is None:
            self._grow_or_preempt(batch)
            batch = [s for s in batch if s.status is Status.RUNNING]
        prev = None
        if launched is not None:
            rows = {id(s): i for i, s in enumerate(launched.batch)}
            prev = PreviousTokens(launched.tokens, [rows.get(id(s), -1) for s in batch])
        logits = self.runner.decode(batch, prev) if batch else None
        if launched is not None:
            outputs += self._settle(launched)  # on the host while the device runs the pass just launched
        if batch:
            step = self._launch(batch, logits)
            if self.config.overlap_steps:
                self._launched = step
            else:
                outputs += self._settle(step)
        return outputs

    def _next_batch(self, launched: _Launched | None) -> list[Sequence]:
        """The running requests, less those that the token in flight will end by length (their next pass would
        write past max_tokens or the context)."""
        if launched is None:
            return list(self.running)
        in_flight = {id(s) for s in launched.batch}
        return [s for s in self.running if id(s) not in in_flight or not self._ends_by_length(s, 1)]

    def _ends_by_length(self, seq: Sequence, ahead: int) -> bool:
        return (
            len(seq.output_token_ids) + ahead >= seq.sampling.max_tokens
            or seq.num_tokens + ahead >= self.max_model_len
        )

    def _grow(self, batch: list[Sequence], launched: _Launched) -> bool:
        """Blocks for every sequence of `batch` to write one more token, one further on for those in flight.
        False if the pool cannot hold them all (then some may have grown: they keep it)."""
        in_flight = {id(s) for s in launched.batch}
        return all(self.blocks.grow(s.block_table, s.num_tokens + (id(s) in in_flight)) for s in batch)

    def _grow_or_preempt(self, batch: list[Sequence]) -> None:
        for seq in batch:
            while seq.status is Status.RUNNING and not self.blocks.grow(seq.block_table, seq.num_tokens):
                self._preempt(self.running[-1])  # the newest goes first; `seq` itself if it is the newest

    def _launch(self, batch: list[Sequence], logits: torch.Tensor) -> _Launched:
        """Sample the pass's tokens on the device and start their copy to the host; nothing waits here."""
        tokens = sample_tensor(logits, batch)
        if tokens.device.type != "cuda":
            return _Launched(batch, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(batch, tokens, host, ready)

    def _settle(self, step: _Launched) -> list[RequestOutput]:
        """Read a pass's tokens and hand them to their requests. A request that ended (or was aborted) since the
        pass was launched drops its token."""
        if step.ready is not None:
            step.ready.synchronize()
        outputs, finished = [], False
        for seq, token in zip(step.batch, step.host.tolist()):
            if seq.status is not Status.RUNNING:
                continue
            self.outputs.append(seq, token)
            outputs.append(self.outputs.take_output(seq))
            if seq.finished:
                self.blocks.free(seq.block_table)
                finished = True
        if finished:
            self.running = [s for s in self.running if s.status is Status.RUNNING]
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting or self._aborted or self._launched)

    def stats(self) -> DecodeStats:
        return DecodeStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_free=self.blocks.num_free_blocks,
            num_preemptions=self.num_preemptions,
        )
