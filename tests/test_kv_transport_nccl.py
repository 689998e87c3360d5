"""The `nccl` KV transport, run over gloo on the CPU (tests/gpu/test_nccl_transport.py runs NCCL on two GPUs).

In one process (two transport objects): bit-exact KV, several hand-offs in flight on one pair, a transfer asked for
twice, a sender that stalls, a receiver that walks away mid-transfer. Between two processes: the KV of a tiny
model's prefill decoded on the other side, a wrong base refused, a sender process dying mid-transfer. Between two
Ray actors: one sends, the other receives, through the transport object.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp

from sunray.engine.config import EngineConfig
from sunray.engine.decode_engine import DecodeEngine
from sunray.engine.handoff import KVHandoff, KVHandoffError
from sunray.engine.prefill_engine import PrefillEngine, PrefillRequest
from sunray.engine.sequence import SamplingParams
from sunray.kv.nccl import NcclRef, NcclTransport
from sunray.kv.transport import KVTransportError, get_transport
from sunray.models.fingerprint import Fingerprint

pytestmark = pytest.mark.usefixtures("single_thread")

FP = Fingerprint("arch", "tok", "weights")
TIMEOUT_S = 2.0
CONFIG = EngineConfig(block_size=4, num_kv_blocks=128)
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 33, 9, 70], [3, 4], list(range(10, 31)), [99] * 9]


def _handoff(i: int, tokens: int = 5, dtype=torch.float32) -> KVHandoff:
    g = torch.Generator().manual_seed(i)
    kv = torch.randn(2, 2, tokens, 2, 8, generator=g).to(dtype)
    return KVHandoff(f"r{i}", "m", FP, list(range(tokens)), [7], SamplingParams(max_tokens=4), kv)


def _digest(kv: torch.Tensor) -> str:
    return hashlib.sha256(kv.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _same(a: KVHandoff, b: KVHandoff) -> bool:
    return (a.request_id, a.fingerprint, a.prompt_token_ids, a.output_token_ids, a.sampling, a.kv.dtype) == (
        b.request_id,
        b.fingerprint,
        b.prompt_token_ids,
        b.output_token_ids,
        b.sampling,
        b.kv.dtype,
    ) and _digest(a.kv) == _digest(b.kv)


@pytest.fixture
def sender():
    t = NcclTransport(timeout_s=TIMEOUT_S)
    yield t
    t.close()


@pytest.fixture
def receiver():
    t = NcclTransport(timeout_s=TIMEOUT_S)
    yield t
    t.close()


def _wait_for(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


# -- one process ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact(sender, receiver, dtype):
    h = _handoff(1, dtype=dtype)
    h.kv[0, 0, 0, 0, :3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)
    ref = sender.send(h)
    # Only the header (and the sender's address) travels through Ray; the KV goes over the pair's group.
    assert isinstance(ref, NcclRef) and ref.backend == "gloo" and len(ref.header) < 1024
    assert _same(receiver.receive(ref), h)
    assert sender.num_pending == 0 and receiver.num_pairs == 1


def test_many_in_flight_on_one_pair(sender, receiver):
    """Hand-offs received concurrently and out of order over one pair: each gets its own bytes."""
    handoffs = [_handoff(i, tokens=3 + i) for i in range(8)]
    refs = [sender.send(h) for h in handoffs]
    order = [5, 0, 7, 2, 1, 6, 3, 4]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(receiver.receive, [refs[i] for i in order]))
    assert all(_same(g, handoffs[i]) for g, i in zip(got, order))
    assert receiver.num_pairs == 1 and sender.num_sender_pairs == 1 and sender.num_pending == 0


def test_a_transfer_is_pulled_once_and_the_pair_survives_a_refusal(sender, receiver):
    ref = sender.send(_handoff(1))
    receiver.receive(ref)
    with pytest.raises(KVTransportError, match="unknown here"):
        receiver.receive(ref)
    assert receiver.num_pairs == 1  # a refusal moved no bytes: the pair is still in step
    assert _same(receiver.receive(sender.send(_handoff(2))), _handoff(2))


def test_header_checks_still_hold(sender, receiver):
    """The KV arrives with its header; the decode engine still refuses another base (and a damaged header fails)."""
    ref = sender.send(_handoff(3))
    handoff = receiver.receive(ref)
    assert handoff.fingerprint == FP
    bad = NcclRef(b"\x81\xa5dtype\xa4int8", ref.host, ref.port, ref.sender, ref.backend, 99)
    with pytest.raises(KVHandoffError, match="damaged"):
        receiver.receive(bad)


def test_two_receivers_pair_separately(sender):
    a, b = NcclTransport(timeout_s=TIMEOUT_S), NcclTransport(timeout_s=TIMEOUT_S)
    try:
        ha, hb = _handoff(1), _handoff(2)
        assert _same(a.receive(sender.send(ha)), ha) and _same(b.receive(sender.send(hb)), hb)
        assert sender.num_sender_pairs == 2
    finally:
        a.close(), b.close()
    assert _wait_for(lambda: sender.num_sender_pairs == 0, 5)


class _StallingSender(NcclTransport):
    """Sends its first KV; from the second on, answers the request and then does not send (a hung peer) until
    released."""

    release = threading.Event()
    sent = 0

    def _send_bytes(self, pg, buf):
        if buf.numel() > 1:
            self.sent += 1
            if self.sent >= 2:
                self.release.wait(30)
        super()._send_bytes(pg, buf)


def test_a_stalled_sender_times_out_and_the_next_transfer_pairs_anew(receiver):
    sender = _StallingSender(timeout_s=TIMEOUT_S)
    try:
        # Pairs; not timed: a TCPStore client connect takes 5 s now and then on this machine.
        receiver.receive(sender.send(_handoff(0)))
        ref = sender.send(_handoff(1))
        start = time.monotonic()
        with pytest.raises(KVTransportError, match="failed"):
            receiver.receive(ref)
        assert time.monotonic() - start < TIMEOUT_S + 2
        assert receiver.num_pairs == 0  # the failed pair was aborted and forgotten
        sender.release.set()
        assert _wait_for(lambda: sender.num_sender_pairs == 0, TIMEOUT_S + 3)  # the sender dropped it too
        h = _handoff(2)
        assert _same(receiver.receive(sender.send(h)), h)
    finally:
        sender.release.set()
        sender.close()


class _AbandoningReceiver(NcclTransport):
    """Takes the answer, then fails before receiving (a decode worker that dies mid-transfer)."""

    def _recv_bytes(self, pg, buf):
        if buf.numel() > 1:
            raise RuntimeError("gone")
        super()._recv_bytes(pg, buf)


def test_a_receiver_gone_mid_transfer_does_not_hang_the_sender(sender):
    quitter = _AbandoningReceiver(timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(KVTransportError, match="gone"):
            quitter.receive(sender.send(_handoff(1)))
        assert _wait_for(lambda: sender.num_sender_pairs == 0, TIMEOUT_S + 3)
    finally:
        quitter.close()
    fresh = NcclTransport(timeout_s=TIMEOUT_S)
    try:
        h = _handoff(2)
        assert _same(fresh.receive(sender.send(h)), h)
    finally:
        fresh.close()


def test_config_and_registry():
    from sunray.serve.config import AppArgs, DecodeAppArgs

    assert isinstance(get_transport("nccl", device="cpu"), NcclTransport)
    a = DecodeAppArgs(kv_transport="nccl", kv_timeout_s=3)
    assert a.kv_transport_options() == {"device": "cpu", "timeout_s": 3}
    assert DecodeAppArgs().kv_transport_options() == {}
    if torch.distributed.is_nccl_available():
        with pytest.raises(ValueError, match="cuda_ipc"):
            DecodeAppArgs(kv_transport="nccl", device="cuda", decode_worker_options={"num_gpus": 0})
        with pytest.raises(ValueError, match="cuda_ipc"):
            AppArgs(kv_transport="nccl", device="cuda", models=[{"name": "m", "ray_actor_options": {}}])
        # a share of a GPU is allowed: several prefill replicas on one GPU, decode workers on another
        DecodeAppArgs(kv_transport="nccl", device="cuda", decode_worker_options={"num_gpus": 0.5})
    else:
        with pytest.raises(ValueError, match="NCCL"):
            DecodeAppArgs(kv_transport="nccl", device="cuda", decode_worker_options={"num_gpus": 1})


def test_nccl_groups_run_in_blocking_wait_mode_and_are_only_aborted(monkeypatch):
    """No NCCL here: a stand-in ProcessGroupNCCL records the environment its constructor sees (torch reads
    TORCH_NCCL_BLOCKING_WAIT there: no watchdog, no heartbeat monitor, see sunray/kv/nccl.py); the variable is
    restored afterwards. An NCCL group is aborted, never shut down (that waits for ops in flight); a gloo group
    whose abort fails is shut down."""
    import torch.distributed as dist

    from sunray.kv import nccl

    seen, calls = [], []

    class ProcessGroupNCCL:
        class Options:
            pass

        def __init__(self, store, rank, size, opts):
            seen.append((os.environ.get("TORCH_NCCL_BLOCKING_WAIT"), rank, size, opts._timeout))

        def abort(self):
            calls.append("abort")
            raise RuntimeError("already aborted")

        def shutdown(self):
            calls.append("shutdown")

    class ProcessGroupGloo(ProcessGroupNCCL):
        pass

    monkeypatch.setattr(dist, "ProcessGroupNCCL", ProcessGroupNCCL, raising=False)
    t = NcclTransport(timeout_s=TIMEOUT_S, connect_timeout_s=5)
    t.backend = "nccl"
    try:
        for before in (None, "0"):
            if before is None:
                monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
            else:
                monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", before)
            pg = t._new_group(object(), 1)
            assert seen[-1][:3] == ("1", 1, 2) and seen[-1][3].total_seconds() == 35
            assert os.environ.get("TORCH_NCCL_BLOCKING_WAIT") == before
    finally:
        t.backend = "gloo"
        t.close()
    nccl._abort(pg)
    assert calls == ["abort"]
    nccl._abort(ProcessGroupGloo.__new__(ProcessGroupGloo))
    assert calls == ["abort", "abort", "shutdown"]


# -- two processes ----------------------------------------------------------------------------------------------
def _tiny_lm(seed: int):
    from conftest import build_tiny_tokenizer, tiny_hf_config

    from sunray.models.config import ModelConfig
    from sunray.models.decoder import Decoder
    from sunray.models.loader import init_dummy_weights, wrap_model

    model = Decoder(ModelConfig.from_hf(tiny_hf_config()))
    init_dummy_weights(model, seed)
    return wrap_model(model.eval().requires_grad_(False), build_tiny_tokenizer())


def _prefill_process(results, done) -> None:
    """A prefill worker: prefills with the base (seed 0) and with another base (seed 1), sends every hand-off."""
    torch.set_num_threads(1)
    transport = NcclTransport(timeout_s=TIMEOUT_S)
    out = []
    for seed in (0, 1):
        engine = PrefillEngine(_tiny_lm(seed), CONFIG, name=f"base{seed}")
        reqs = [PrefillRequest(f"s{seed}-{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
        for r in engine.prefill(reqs):
            out.append((seed, transport.send(r.handoff), _digest(r.handoff.kv), r.output.new_token_ids))
    results.put(out)
    done.wait(60)
    transport.close()


def test_tiny_model_kv_between_two_processes(make_lm, receiver):
    ctx = mp.get_context("spawn")
    results, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_prefill_process, args=(results, done), daemon=True)
    proc.start()
    try:
        sent = results.get(timeout=60)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # all in flight at once on one pair
            got = list(pool.map(receiver.receive, [ref for _, ref, _, _ in sent]))
    finally:
        done.set()
    proc.join(30)
    assert proc.exitcode == 0
    assert [_digest(h.kv) for h in got] == [d for _, _, d, _ in sent]  # bit for bit
    # The base's KV decodes exactly as a local prefill + decode does; another base's KV is refused.
    lm = make_lm(0)
    decode, reference = DecodeEngine(lm, CONFIG), DecodeEngine(lm, CONFIG)
    local = PrefillEngine(lm, CONFIG).prefill(
        [PrefillRequest(f"s0-{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    )
    tokens: dict[tuple[str, str], list[int]] = {}
    for (seed, _, _, first), h, loc in zip(sent, got, local + [None] * len(PROMPTS)):
        if seed == 1:
            with pytest.raises(KVHandoffError, match="written for base"):
                decode.add(h)
            continue
        decode.add(h)
        reference.add(loc.handoff)
        tokens[("remote", h.request_id)] = list(first)
        tokens[("local", h.request_id)] = list(loc.output.new_token_ids)
    for name, engine in (("remote", decode), ("local", reference)):
        while engine.has_unfinished():
            for out in engine.step():
                tokens[(name, out.request_id)] += out.new_token_ids
    for i in range(len(PROMPTS)):
        assert tokens[("remote", f"s0-{i}")] == tokens[("local", f"s0-{i}")]
        assert len(tokens[("remote", f"s0-{i}")]) == GREEDY.max_tokens


class _DyingSender(NcclTransport):
    """Sends its first KV; at the second, answers the request, then its process dies before the KV goes out."""

    sent = 0

    def _send_bytes(self, pg, buf):
        if buf.numel() > 1:
            self.sent += 1
            if self.sent >= 2:
                os._exit(3)
        super()._send_bytes(pg, buf)


def _dying_process(results) -> None:
    torch.set_num_threads(1)
    transport = _DyingSender(timeout_s=TIMEOUT_S)
    results.put([transport.send(_handoff(i)) for i in range(3)])
    time.sleep(60)


def test_a_sender_process_dying_mid_transfer_fails_the_receiver_within_the_timeout(receiver):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_dying_process, args=(results,), daemon=True)
    proc.start()
    try:
        first, second, third = results.get(timeout=60)
        # Pairs; not timed: a TCPStore client connect takes 5 s now and then on this machine.
        assert _same(receiver.receive(first), _handoff(0))
        start = time.monotonic()
        with pytest.raises(KVTransportError):
            receiver.receive(second)
        assert time.monotonic() - start < TIMEOUT_S + 2
        proc.join(10)
        assert proc.exitcode == 3
        start = time.monotonic()
        with pytest.raises(KVTransportError, match="gone"):  # nobody listens any more: fails at once
            receiver.receive(third)
        assert time.monotonic() - start < 1
        assert receiver.num_pairs == 0
    finally:
        if proc.is_alive():
            proc.kill()


# -- two Ray actors ---------------------------------------------------------------------------------------------
def test_between_two_ray_actors():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    # A Ray of its own ("local"): never attach to another instance on this machine.
    if started:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="sunray-kv"
        )
    try:

        @ray.remote(num_cpus=0)
        class Peer:
            def __init__(self):
                from sunray.kv.nccl import NcclTransport

                torch.set_num_threads(1)
                self.transport = NcclTransport(timeout_s=10)

            def send(self, seed: int):
                from sunray.engine.handoff import KVHandoff
                from sunray.engine.sequence import SamplingParams
                from sunray.models.fingerprint import Fingerprint

                kv = torch.randn(2, 2, 6, 2, 8, generator=torch.Generator().manual_seed(seed)).to(
                    torch.bfloat16
                )
                handoff = KVHandoff(
                    f"ray-{seed}", "m", Fingerprint("a", "t", "w"), list(range(6)), [1], SamplingParams(), kv
                )
                return self.transport.send(handoff), kv.view(torch.uint8).numpy().tobytes()

            def receive(self, ref):
                h = self.transport.receive(ref)
                return h.request_id, h.kv.view(torch.uint8).numpy().tobytes(), self.transport.num_pairs

        prefill, decode = Peer.remote(), Peer.remote()
        for seed in (1, 2):
            ref, raw = ray.get(prefill.send.remote(seed), timeout=60)
            assert ref.host != "" and ref.backend == "gloo"
            rid, got, pairs = ray.get(decode.receive.remote(ref), timeout=60)
            assert (rid, got, pairs) == (f"ray-{seed}", raw, 1)
        for actor in (prefill, decode):
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
