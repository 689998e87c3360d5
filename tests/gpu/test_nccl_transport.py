"""The `nccl` KV transport between two GPUs of one host: prefill processes on cuda:0 send, receivers on cuda:1
(skipped unless 2 GPUs). Bit-exact KV, several hand-offs in flight, a pair on one GPU refused, a micro-benchmark
printing GB/s for a 128 MiB KV tensor, and peer death: a sender dying mid-transfer fails only that transfer,
within the timeout, and its receiver pairs with a new sender afterwards; a receiver dying mid-transfer leaves
its sender serving others. The peer-death test runs its receivers in processes of their own, so this process
cannot hang on NCCL; every test is also ended (with a traceback dump) if it runs past 180 s.

    CUDA_VISIBLE_DEVICES=2,3 NCCL_NVLS_ENABLE=0 timeout 240 python3 -m pytest -q -s tests/gpu/test_nccl_transport.py
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import faulthandler
import glob
import os
import queue
import statistics
import sys
import time
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp

from sunray.engine.handoff import KVHandoff
from sunray.engine.sequence import SamplingParams
from sunray.kv.nccl import NcclTransport
from sunray.kv.transport import KVTransportError
from sunray.models.fingerprint import Fingerprint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

FP = Fingerprint("arch", "tok", "weights")
TIMEOUT_S = 10.0
DEATH_TIMEOUT_S = 5.0  # the peer-death test's kv timeout: a transfer whose peer died fails within about this
SMALL = (32, 2, 300, 8, 128)  # an 8B-shaped hand-off: 32 layers, 300 tokens, GQA 8 x 128, bf16 (about 39 MB)
BIG = (32, 2, 1024, 8, 128)  # 128 MiB in bf16
CTX = mp.get_context("spawn")


@pytest.fixture(autouse=True)
def _never_hang():
    """A test still running after 180 s dumps every thread's traceback and ends this process (exit code 1)."""
    faulthandler.dump_traceback_later(180, exit=True, file=sys.__stderr__)
    yield
    faulthandler.cancel_dump_traceback_later()


def _handoff(i: int, shape, device) -> KVHandoff:
    g = torch.Generator(device=device).manual_seed(i)
    kv = torch.randn(shape, generator=g, device=device).to(torch.bfloat16)
    tokens = shape[2]
    return KVHandoff(f"r{i}", "m", FP, list(range(tokens)), [7], SamplingParams(max_tokens=4), kv)


def _checksum(kv: torch.Tensor) -> int:
    return int(kv.contiguous().view(torch.int16).to(torch.int64).sum().item())


def _nccl_threads() -> list[str]:
    """This process's ProcessGroupNCCL watchdog and heartbeat-monitor threads: none, since the transport's groups
    run in blocking-wait mode (sunray/kv/nccl.py, "NCCL and a dead peer")."""
    names = []
    for path in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(path) as f:
                name = f.read().strip()
        except OSError:  # the thread ended
            continue
        if name.startswith(("pt_nccl_watchdg", "pt_nccl_heartbt")):
            names.append(name)
    return names


class _DyingSender(NcclTransport):
    """Sends `die_after` KV tensors, then answers the next request and exits before sending it."""

    die_after = 10**9
    sent = 0

    def _send_bytes(self, pg, buf):
        if buf.numel() > 1:
            self.sent += 1
            if self.sent > self.die_after:
                os._exit(3)
        super()._send_bytes(pg, buf)


def _sender(results, done, shapes, die_after, timeout_s) -> None:
    """The prefill side on cuda:0: sends one hand-off per shape, reports (ref, checksum), keeps them until done,
    then reports its NCCL threads and closes."""
    torch.cuda.set_device(0)
    transport = _DyingSender(device="cuda:0", timeout_s=timeout_s)
    transport.die_after = die_after
    handoffs = [_handoff(i, shape, "cuda:0") for i, shape in enumerate(shapes)]
    torch.cuda.synchronize()
    results.put([(transport.send(h), _checksum(h.kv)) for h in handoffs])
    with contextlib.suppress(queue.Empty):
        done.get(timeout=300)
    results.put(_nccl_threads())
    transport.close()


@dataclass
class _Sender:
    proc: object
    results: object
    done: object
    _sent: list | None = None

    @property
    def sent(self) -> list:
        """[(ref, checksum)], one per shape."""
        if self._sent is None:
            self._sent = self.results.get(timeout=120)
        return self._sent

    def finish(self, timeout_s: float = 30) -> list[str]:
        """Lets the sender close; returns its NCCL threads (as it reported them before closing)."""
        self.done.put(True)
        threads = self.results.get(timeout=timeout_s)
        self.proc.join(timeout_s)
        return threads


@pytest.fixture
def sender():
    """start(shapes, die_after=None, timeout_s=TIMEOUT_S) -> _Sender: a sender process on cuda:0."""
    started = []

    def start(shapes, die_after=10**9, timeout_s=TIMEOUT_S):
        # `done` is a queue, not an Event: Event.set() blocks forever once a process died waiting on it (the
        # dying sender), which is what hung this file's first GPU run after its failure.
        results, done = CTX.Queue(), CTX.Queue()
        p = CTX.Process(target=_sender, args=(results, done, shapes, die_after, timeout_s), daemon=True)
        p.start()
        started.append(_Sender(p, results, done))
        return started[-1]

    yield start
    for s in started:
        s.done.put(True)
    for s in started:
        s.proc.join(30)
        if s.proc.is_alive():
            s.proc.kill()


@pytest.fixture
def receiver():
    torch.cuda.set_device(1)
    t = NcclTransport(device="cuda:1", timeout_s=TIMEOUT_S)
    yield t
    t.close()


def test_kv_between_two_gpus_is_exact_and_in_order(sender, receiver):
    sent = sender([SMALL] * 6 + [(32, 2, 1, 8, 128)]).sent
    first = receiver.receive(sent[0][0])  # pairs (NCCL builds its communicator here)
    assert first.kv.device == torch.device("cuda:1") and _checksum(first.kv) == sent[0][1]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # the rest in flight at once, out of order
        order = [6, 3, 1, 5, 2, 4]
        got = list(pool.map(receiver.receive, [sent[i][0] for i in order]))
    assert [(h.request_id, _checksum(h.kv)) for h in got] == [(f"r{i}", sent[i][1]) for i in order]
    assert receiver.num_pairs == 1
    assert _nccl_threads() == []  # blocking-wait groups: no watchdog, no heartbeat monitor


def test_a_pair_on_one_gpu_is_refused(sender):
    sent = sender([SMALL]).sent
    torch.cuda.set_device(0)
    same_gpu = NcclTransport(device="cuda:0", timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(KVTransportError, match="cuda_ipc"):
            same_gpu.receive(sent[0][0])
    finally:
        same_gpu.close()
        torch.cuda.set_device(1)


def test_nccl_bandwidth_128mib(sender, receiver, capsys):
    n = 12
    sent = sender([BIG] * (n + 2)).sent
    nbytes = torch.Size(BIG).numel() * 2
    for ref, _ in sent[:2]:  # pairing and warm-up
        receiver.receive(ref)
    times = []
    for ref, checksum in sent[2:]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        # ask, answer, NCCL send/recv: returns once the bytes are in cuda:1's memory
        h = receiver.receive(ref)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert _checksum(h.kv) == checksum
        del h
    med = statistics.median(times)
    with capsys.disabled():
        print(
            f"\nnccl KV transport, {nbytes / 2**20:.0f} MiB bf16 cuda:0 -> cuda:1, {n} transfers: median "
            f"{med * 1e3:.2f} ms = {nbytes / med / 1e9:.1f} GB/s (best {nbytes / min(times) / 1e9:.1f} GB/s; "
            f"includes the request/answer round trip over the TCPStore)"
        )


# -- peer death: the receivers run in processes of their own -----------------------------------------------------
def _outcome(fn) -> dict:
    start = time.monotonic()
    try:
        h = fn()
        return {"ok": True, "s": time.monotonic() - start, "checksum": _checksum(h.kv)}
    except KVTransportError as e:
        return {"ok": False, "s": time.monotonic() - start, "error": f"{type(e).__name__}: {e}"[:400]}


def _report(out, proc, timeout_s: float) -> dict:
    """The report `proc` puts on `out`, or a "crash" entry if it exits without one or runs past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=1)
        except queue.Empty:
            if not proc.is_alive():
                try:
                    return out.get(timeout=2)
                except queue.Empty:
                    return {"crash": f"the receiver process exited ({proc.exitcode}) without a report"}
    return {"crash": f"no report from the receiver process within {timeout_s:g} s"}


def _survivor(dying, healthy, quitter_gone, out) -> None:
    """A decode worker on cuda:1: pairs with the dying sender, sees it die mid-transfer, then pairs with a healthy
    sender and keeps receiving from it while another receiver of that sender dies mid-transfer."""
    torch.cuda.set_device(1)
    t = NcclTransport(device="cuda:1", timeout_s=DEATH_TIMEOUT_S)
    report: dict = {}
    try:
        report["paired"] = _outcome(lambda: t.receive(dying[0][0]))  # pairs; the sender sends this one
        report["mid"] = _outcome(lambda: t.receive(dying[1][0]))  # answered, then the sender exits
        report["after"] = _outcome(lambda: t.receive(dying[2][0]))  # nobody listens any more
        report["pairs_after_death"] = t.num_pairs
        report["gpu_after_death"] = torch.ones(4, device="cuda:1").sum().item()
        report["new_pair"] = _outcome(lambda: t.receive(healthy[0][0]))  # a new sender, a new pair
        report["quitter_gone"] = quitter_gone.get(timeout=60)
        report["beside_dead_pair"] = [_outcome(lambda r=r: t.receive(r)) for r, _ in healthy[1:3]]
        report["nccl_threads"] = _nccl_threads()
    except BaseException as e:  # reported, not raised: the parent asserts on the report
        report["crash"] = repr(e)[:400]
    out.put(report)
    t.close()


class _QuittingReceiver(NcclTransport):
    """Takes the sender's answer, then its process exits before posting the receive (a decode worker dying
    mid-transfer: the sender's send is posted and waits for a dead peer)."""

    def _recv_bytes(self, pg, buf):
        if buf.numel() > 1:
            os._exit(5)
        super()._recv_bytes(pg, buf)


def _quitter(ref) -> None:
    torch.cuda.set_device(1)
    _QuittingReceiver(device="cuda:1", timeout_s=DEATH_TIMEOUT_S).receive(ref)


def test_peer_death_fails_only_that_transfer_and_the_processes_pair_again(sender):
    dying = sender([SMALL] * 3, die_after=1, timeout_s=DEATH_TIMEOUT_S)
    healthy = sender([SMALL] * 4, timeout_s=DEATH_TIMEOUT_S)
    out, quitter_gone = CTX.Queue(), CTX.Queue()
    args = (dying.sent, healthy.sent[:3], quitter_gone, out)
    survivor = CTX.Process(target=_survivor, args=args, daemon=True)
    quitter = CTX.Process(target=_quitter, args=(healthy.sent[3][0],), daemon=True)
    survivor.start()
    quitter.start()
    try:
        quitter.join(60)
        quitter_exit = quitter.exitcode
        quitter_gone.put(True)
        report = _report(out, survivor, 60)
        survivor.join(20)  # it closes its transport and exits: NCCL must not hold the process
        survivor_exit = survivor.exitcode
        dying.proc.join(10)
        healthy_threads = healthy.finish()
    finally:
        for p in (survivor, quitter):
            if p.is_alive():
                p.kill()
    print(f"\npeer death: {report}")
    assert "crash" not in report, report
    sums = [c for _, c in dying.sent]
    assert report["paired"]["ok"] and report["paired"]["checksum"] == sums[0]
    # The sender answered, then died before sending: this transfer fails, within the timeout (not a process kill).
    assert not report["mid"]["ok"] and report["mid"]["s"] < DEATH_TIMEOUT_S + 5, report["mid"]
    assert dying.proc.exitcode == 3
    assert not report["after"]["ok"] and "gone" in report["after"]["error"] and report["after"]["s"] < 2
    assert report["pairs_after_death"] == 0 and report["gpu_after_death"] == 4
    # The same process pairs with a new sender, and receives from it while that sender's other pair (to the
    # quitter, which died mid-transfer) is stuck and then fails on the sender's side.
    sums = [c for _, c in healthy.sent]
    assert report["new_pair"]["ok"] and report["new_pair"]["checksum"] == sums[0]
    assert quitter_exit == 5 and report["quitter_gone"]
    beside = report["beside_dead_pair"]
    assert [(o["ok"], o.get("checksum")) for o in beside] == [(True, sums[1]), (True, sums[2])]
    # No watchdog or heartbeat monitor anywhere, and every process ends on its own.
    assert report["nccl_threads"] == [] and healthy_threads == []
    assert survivor_exit == 0 and healthy.proc.exitcode == 0
