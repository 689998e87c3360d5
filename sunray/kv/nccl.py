"""The `nccl` KV transport: the KV tensor moves straight from the prefill worker's GPU to the decode worker's GPU by
a point-to-point send/recv of torch.distributed (NCCL on CUDA; gloo on the CPU, which the CPU tests run); only the
msgpack header and the sender's address travel through Ray, in the reference that `send` returns.

Groups. A sender (a prefill replica) hosts a `TCPStore` of its own, started on a free port at its first `send`;
the reference names it. A receiver (a decode worker) that meets a sender for the first time connects to that
store, takes a pair number, asks to pair on the store's "peers" queue, and both sides build a two-rank group of
their own (`ProcessGroupNCCL` / `ProcessGroupGloo` on a `PrefixStore` of the pair; the sender is rank 0). There
is no global world and no `init_process_group`, so replicas come and go (autoscaling, restarts) without the others
taking part: the approach of vLLM's stateless process groups, and like SGLang's disaggregation, the prefill side
hosts the rendezvous. A one-byte warm-up transfer makes NCCL build its communicator at pairing, not at the first
request. Both sides cache the pair.

Ordering. The receiver pulls: holding the pair's lock it pushes (seq, transfer id) onto the pair's request queue;
the sender's thread for that pair pops it and answers (seq, transfer id, byte count) or an error on the answer
queue, then posts the send; the receiver checks the answer against what it asked for and posts the matching recv.
NCCL has no tags, so sends and recvs of a pair only match in order: one transfer per pair at a time. Different
pairs (other decode workers, other prefill replicas) run in parallel.

Failure. Every wait is bounded by `timeout_s`: the answer (it fails at once when the sender's process, which
hosts the store, is gone) and the transfer (gloo's timeout; NCCL's `work.wait(timeout)`); pairing by
`connect_timeout_s`. A pair that fails is aborted and forgotten on both sides (the next transfer pairs anew) and
the receiver raises KVTransportError; the ingress then re-prefills. A peer's death fails only the transfers of
its pair: NCCL groups run in blocking-wait mode, without torch's watchdog (see "NCCL and a dead peer" below).
The sender drops KV once sent, and KV nobody asked for after `hold_s`. A pair whose decode worker died while
idle keeps one thread and one communicator on the sender until the sender closes.

NCCL needs the two ends on distinct GPUs: a pair on one GPU is refused (use `cuda_ipc` there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta

import msgpack
import torch

from sunray.engine.handoff import KVHandoff, KVHandoffError
from sunray.kv import handoff as wire
from sunray.kv.base import KVTransport, KVTransportError

log = logging.getLogger("sunray.kv")
_FOREVER = timedelta(days=365)  # serving threads block on their queues; close() wakes them with a message


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


def local_host() -> str:
    """The address peers reach this process at: $SUNRAY_KV_HOST, else Ray's node IP inside Ray, else loopback."""
    if os.environ.get("SUNRAY_KV_HOST"):
        return os.environ["SUNRAY_KV_HOST"]
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.util.get_node_ip_address()
    return "127.0.0.1"


# NCCL and a dead peer (ProcessGroupNCCL of torch 2.11, from its source and the GPU run of
# tests/gpu/test_nccl_transport.py on torch 2.11 + NCCL 2.28).
#
# NCCL point-to-point is a rendezvous: a recv whose sender died (or a send whose receiver died) never completes,
# and NCCL did not report the dead peer by itself (the GPU run's recv failed only at its timeout). The op ends
# when its communicator is aborted (ncclCommAbort makes the kernel return).
#
# By default every ProcessGroupNCCL starts a watchdog thread (which starts a heartbeat-monitor thread) and hands
# it a copy of every op. On an op that failed or timed out (or one still in its list when we abort the
# communicator ourselves: the abort leaves ncclSystemError, "unhandled system error"), the watchdog, whatever
# TORCH_NCCL_ASYNC_ERROR_HANDLING says:
#   - writes "exception_dump" into the group's underlying store (here the sender's TCPStore, which the sender's
#     own groups poll) and sets a process-wide "should dump" flag;
#   - sleeps 4 x TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC (60 s by default) holding the group's work list; whoever
#     joins the watchdog meanwhile (the group's destructor, run where the last reference drops, GIL held) waits:
#     in the GPU run the receive raised after 10 s but the test ended after that 60 s sleep, failing its bound;
#   - then aborts the communicators (modes 1, 2) and rethrows in the watchdog thread, which ends the process
#     (modes 1 and 3, the default; the "taking the entire process down" path).
# And the heartbeat monitor of the process's first group (uid 0), seeing "should dump" (its process's flag or the
# key in its store; TORCH_NCCL_DUMP_ON_TIMEOUT=1, the default), dumps the flight recorder and,
# TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC (8 min) later, std::abort()s the process unless TORCH_NCCL_ENABLE_MONITORING=0
# or that group was aborted by then: one prefill replica dying would end decode workers (and prefill replicas
# that share a decode worker with it) minutes later. So TORCH_NCCL_ASYNC_ERROR_HANDLING=2, which this module set
# before (and which did take effect: no teardown in the GPU run), stops neither the stall nor the monitor. These
# variables are read by each ProcessGroupNCCL's constructor (getenv), not at `import torch` or the first group.
#
# So this module builds its NCCL groups with TORCH_NCCL_BLOCKING_WAIT=1, set for the constructor call only
# (other groups of the process keep their settings). In blocking-wait mode (torch >= 2.6) a group starts neither
# watchdog nor monitor and hands over no ops: nothing sleeps, dumps, signals other processes or ends the process.
# An error or timeout surfaces only in `work.wait(timeout)`, in the waiting thread: WorkNCCL::wait aborts the
# pair's communicator (the kernel returns) and raises DistBackendError (it logs "To avoid data inconsistency, we
# are taking the entire process down." and only raises), which `receive` turns into KVTransportError after
# about `timeout_s`. The pair's group is then aborted (abort(), never shutdown(): that finalizes the
# communicator, which waits for the ops in flight, forever with a dead peer) and forgotten; the next transfer
# pairs anew, with a new group and communicator. Other pairs are untouched (a communicator each). Not bounded by
# this module: ncclCommAbort itself (0.5 s in the GPU run) and building a communicator at pairing if the peer
# dies during it.
_NCCL_GROUP_ENV = {"TORCH_NCCL_BLOCKING_WAIT": "1"}
_env_lock = threading.Lock()


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables while a ProcessGroupNCCL reads them (its constructor), then restore them."""
    with _env_lock:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _abort(pg) -> None:
    """Abort a pair's group (best effort: a broken group has nothing more to release). An NCCL group is only ever
    aborted: its shutdown() finalizes the communicator, which waits for ops in flight (forever with a dead peer)."""
    names = ("abort",) if type(pg).__name__ == "ProcessGroupNCCL" else ("abort", "shutdown")
    for name in names:
        fn = getattr(pg, name, None)
        if fn is not None:
            try:
                fn()
                return
            except Exception as e:
                log.debug("KV pair group %s(): %s: %s", name, type(e).__name__, e)


@dataclasses.dataclass(frozen=True)
class NcclRef:
    """What travels through Ray: the hand-off's header and where to pull its KV from."""

    header: bytes  # msgpack, as sunray.kv.handoff.header()
    host: str  # the sender's store
    port: int
    sender: str  # the sender's token: a store that reuses the port is not taken for this sender
    backend: str  # "nccl" or "gloo"
    transfer: int  # -1: no bytes to move (empty KV)
    gpu: str | None = None  # the sender's GPU UUID (nccl)


class _Pair:
    """The receiver's side of one (sender, receiver) pair."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pg = None
        self.ctl = None  # store client for the request and answer queues
        self.pid = -1
        self.seq = 0


class NcclTransport(KVTransport):
    """KV over torch.distributed point-to-point. `device` is where this side's KV lives (the receiver allocates its
    buffers there): a CUDA device runs NCCL, the CPU gloo. One object serves as sender, receiver or both."""

    name = "nccl"
    blocking = True  # receive() waits on the network: call it off the event loop

    def __init__(
        self,
        device: str | torch.device = "cpu",
        timeout_s: float = 10.0,
        connect_timeout_s: float = 60.0,
        hold_s: float = 60.0,
        host: str | None = None,
    ) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise KVTransportError("kv_transport nccl needs torch.distributed, which this torch build lacks")
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.backend == "nccl" and not dist.is_nccl_available():
            raise KVTransportError("kv_transport nccl on CUDA needs a torch build with NCCL")
        if self.backend == "gloo" and not dist.is_gloo_available():
            raise KVTransportError("kv_transport nccl on the CPU runs gloo, which this torch build lacks")
        self.timeout = timedelta(seconds=timeout_s)
        self.connect_timeout = timedelta(seconds=connect_timeout_s)
        self.hold_s = hold_s
        self._host = host
        self._lock = threading.Lock()
        self._closed = False
        # sender
        self._server = None
        self._token = uuid.uuid4().hex
        self._ids = itertools.count()
        self._pending: dict[int, tuple[float, torch.Tensor]] = {}
        self._sender_pairs: dict[int, object] = {}
        self._threads: list[threading.Thread] = []
        # receiver
        self._pairs: dict[tuple[str, int, str], _Pair] = {}

    # -- common ---------------------------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        if self._host is None:
            self._host = local_host()
        return self._host

    def _dev(self) -> torch.device:
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        return self.device

    def _gpu(self) -> str | None:
        return str(torch.cuda.get_device_properties(self._dev()).uuid) if self.backend == "nccl" else None

    def _client(self, host: str, port: int, timeout: timedelta):
        import torch.distributed as dist

        return dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)

    def _new_group(self, store, rank: int):
        """A two-rank group of its own on `store` (no global world). Its own timeout is a backstop: the waits in
        this module are shorter and abort the group first."""
        import torch.distributed as dist

        backstop = max(self.timeout, self.connect_timeout) + timedelta(seconds=30)
        if self.backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = backstop
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
            return dist.ProcessGroupGloo(store, rank, 2, opts)
        # Blocking-wait mode: no watchdog, no heartbeat monitor; errors only in work.wait() (see above).
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = backstop
        with _environ(_NCCL_GROUP_ENV):
            return dist.ProcessGroupNCCL(store, rank, 2, opts)

    def _wait(self, work, what: str) -> None:
        if not work.wait(self.timeout):
            raise TimeoutError(f"{what} did not complete within {self.timeout.total_seconds():g} s")

    def _send_bytes(self, pg, buf: torch.Tensor) -> None:
        self._wait(pg.send([buf], 1, 0), "KV send")

    def _recv_bytes(self, pg, buf: torch.Tensor) -> None:
        self._wait(pg.recv([buf], 0, 0), "KV receive")

    def close(self) -> None:
        """End the serving threads and every pair (best effort; peers see their pair fail and pair anew)."""
        with self._lock:
            self._closed = True
            pairs, self._pairs = list(self._pairs.values()), {}
            sender_pairs, self._sender_pairs = dict(self._sender_pairs), {}
            server, self._pending = self._server, {}
        for p in pairs:
            with p.lock:
                if p.ctl is not None:
                    with contextlib.suppress(Exception):
                        p.ctl.queue_push(f"pair/{p.pid}/req", _pack({"bye": True}))
                self._drop_locked(p)
        if server is None:
            return
        with contextlib.suppress(Exception):  # wake the serving threads; each aborts its own group
            for pid in sender_pairs:
                server.queue_push(f"pair/{pid}/req", _pack({"bye": True}))
            server.queue_push("peers", _pack({"bye": True}))
        deadline = time.monotonic() + self.timeout.total_seconds() + 1
        while time.monotonic() < deadline:  # a transfer in flight ends within the timeout
            with self._lock:
                alive = [t for t in self._threads if t.is_alive()]
            if not alive:
                break
            alive[0].join(max(0.0, deadline - time.monotonic()))
        self._server = None  # the store goes once no thread uses it (else C++ threads die joinable at exit)

    # -- the sender (prefill) side --------------------------------------------------------------------------------
    def send(self, handoff: KVHandoff) -> NcclRef:
        kv = handoff.kv.detach()
        if (kv.device.type == "cuda") != (self.backend == "nccl"):
            raise ValueError(
                f"this nccl transport runs {self.backend} and cannot send KV on {kv.device}: give "
                "the transport the device the KV is on"
            )
        buf = kv.contiguous().view(-1).view(torch.uint8) if kv.numel() else None
        self._ensure_server()
        now = time.monotonic()
        with self._lock:
            for tid in [t for t, (at, _) in self._pending.items() if now - at > self.hold_s]:
                del self._pending[tid]
            tid = next(self._ids) if buf is not None else -1
            if buf is not None:
                self._pending[tid] = (now, buf)
        return NcclRef(
            _pack(wire.header(handoff)),
            self.host,
            self._server.port,
            self._token,
            self.backend,
            tid,
            self._gpu(),
        )

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def num_sender_pairs(self) -> int:
        with self._lock:
            return len(self._sender_pairs)

    def _ensure_server(self) -> None:
        import torch.distributed as dist

        with self._lock:
            if self._closed:
                raise KVTransportError("this KV transport is closed")
            if self._server is not None:
                return
            self._server = dist.TCPStore(
                self.host, 0, is_master=True, wait_for_workers=False, timeout=_FOREVER
            )
            self._server.set("sender", self._token)
            accept = self._client(self.host, self._server.port, _FOREVER)
        self._start(self._accept, accept, name="kv-nccl-accept")

    def _start(self, target, *args, name: str) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _accept(self, store) -> None:
        """Pair with each receiver that asks (the "peers" queue), one serving thread per pair."""
        while True:
            try:
                msg = _unpack(store.queue_pop("peers"))
            except Exception:  # the store is gone: this transport was closed or collected
                return
            if msg.get("bye") or self._closed:
                return
            pid = msg["pair"]
            error = None
            if msg.get("backend") != self.backend:
                error = f"the sender runs {self.backend}, the receiver {msg.get('backend')}"
            elif self.backend == "nccl" and msg.get("gpu") == self._gpu():
                error = (
                    f"prefill and decode share GPU {msg.get('gpu')}: NCCL needs two GPUs; use "
                    "kv_transport: cuda_ipc for KV within one GPU"
                )
            store.queue_push(f"pair/{pid}/hello", _pack({"error": error}))
            if error is None:
                self._start(self._serve_pair, pid, name=f"kv-nccl-pair-{pid}")

    def _serve_pair(self, pid: int) -> None:
        import torch.distributed as dist

        pg = None
        try:
            ctl = self._client(self.host, self._server.port, _FOREVER)
            pg_store = self._client(self.host, self._server.port, self.connect_timeout)
            pg = self._new_group(dist.PrefixStore(f"pair/{pid}/pg", pg_store), 0)
            # Warm-up: NCCL builds the pair's communicator now, not at the first request.
            self._send_bytes(pg, torch.ones(1, dtype=torch.uint8, device=self._dev()))
            with self._lock:
                if self._closed:
                    raise KVTransportError("closed")
                self._sender_pairs[pid] = pg
            while True:
                req = _unpack(ctl.queue_pop(f"pair/{pid}/req"))
                if req.get("bye"):
                    return
                seq, tid = req["seq"], req["transfer"]
                with self._lock:
                    entry = self._pending.pop(tid, None)
                if entry is None:
                    ctl.queue_push(
                        f"pair/{pid}/ack",
                        _pack(
                            {
                                "seq": seq,
                                "transfer": tid,
                                "error": f"transfer {tid} is unknown here: sent already, or held longer than "
                                f"{self.hold_s:g} s",
                            }
                        ),
                    )
                    continue
                buf = entry[1]
                ctl.queue_push(f"pair/{pid}/ack", _pack({"seq": seq, "transfer": tid, "nbytes": buf.numel()}))
                self._send_bytes(pg, buf)
        except Exception as e:
            if not self._closed:
                log.warning("KV pair %d: %s: %s; the pair is dropped", pid, type(e).__name__, e)
        finally:
            with self._lock:
                self._sender_pairs.pop(pid, None)
            if pg is not None:
                _abort(pg)

    # -- the receiver (decode) side -------------------------------------------------------------------------------
    def receive(self, ref: NcclRef) -> KVHandoff:
        h = _unpack(ref.header)
        dtype, shape = wire.DTYPES.get(h.get("dtype")), h.get("shape")
        sizes_ok = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        if dtype is None or not sizes_ok:
            raise KVHandoffError(f"damaged KV hand-off header: dtype {h.get('dtype')!r}, shape {shape!r}")
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if ref.transfer < 0 or nbytes == 0:
            return wire.from_header(h, torch.empty(shape, dtype=dtype, device=self._dev()))
        if ref.backend != self.backend:
            raise KVTransportError(
                f"the sender runs {ref.backend}, this receiver {self.backend}: give prefill and "
                "decode the same kind of device"
            )
        if self.backend == "nccl" and ref.gpu == self._gpu():
            raise KVTransportError(
                f"prefill and decode share GPU {ref.gpu}: NCCL needs two GPUs; use "
                "kv_transport: cuda_ipc for KV within one GPU"
            )
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self._dev())
        key = (ref.host, ref.port, ref.sender)
        with self._lock:
            if self._closed:
                raise KVTransportError("this KV transport is closed")
            pair = self._pairs.setdefault(key, _Pair())
        refused = None
        with pair.lock:
            try:
                if pair.pg is None:
                    self._connect(pair, ref)
                pair.seq += 1
                pair.ctl.queue_push(
                    f"pair/{pair.pid}/req", _pack({"seq": pair.seq, "transfer": ref.transfer})
                )
                ack = _unpack(pair.ctl.queue_pop(f"pair/{pair.pid}/ack"))
                if (ack.get("seq"), ack.get("transfer")) != (pair.seq, ref.transfer):
                    raise KVTransportError(
                        f"out of step: asked for {pair.seq}/{ref.transfer}, the sender answered "
                        f"{ack.get('seq')}/{ack.get('transfer')}"
                    )
                if ack.get("error"):  # nothing was posted: the pair stays in step and is kept
                    refused = KVTransportError(f"request {h.get('request_id')}: {ack['error']}")
                elif ack.get("nbytes") != nbytes:
                    raise KVTransportError(
                        f"the sender has {ack.get('nbytes')} bytes, the header says {nbytes}"
                    )
                else:
                    self._recv_bytes(pair.pg, buf)
            except KVTransportError:
                self._forget(key, pair)
                raise
            except Exception as e:
                self._forget(key, pair)
                raise KVTransportError(
                    f"KV of request {h.get('request_id')} from {ref.host}:{ref.port} failed: "
                    f"{type(e).__name__}: {e}"
                ) from e
        if refused is not None:
            raise refused
        return wire.from_header(h, buf.view(dtype).view(shape))

    @property
    def num_pairs(self) -> int:
        with self._lock:
            return sum(p.pg is not None for p in self._pairs.values())

    def _connect(self, pair: _Pair, ref: NcclRef) -> None:
        import torch.distributed as dist

        try:  # a refused connection fails now; TCPStore would retry until its timeout
            socket.create_connection((ref.host, ref.port), timeout=self.timeout.total_seconds()).close()
        except OSError as e:
            raise KVTransportError(f"the KV sender at {ref.host}:{ref.port} is gone: {e}") from None
        ctl = self._client(ref.host, ref.port, self.connect_timeout)
        if ctl.get("sender").decode() != ref.sender:
            raise KVTransportError(
                f"{ref.host}:{ref.port} is another sender now (the prefill replica restarted)"
            )
        pid = ctl.add("pairs", 1)
        ctl.queue_push("peers", _pack({"pair": pid, "backend": self.backend, "gpu": self._gpu()}))
        hello = _unpack(ctl.queue_pop(f"pair/{pid}/hello"))
        if hello.get("error"):
            raise KVTransportError(hello["error"])
        pg_store = self._client(ref.host, ref.port, self.connect_timeout)
        pg = self._new_group(dist.PrefixStore(f"pair/{pid}/pg", pg_store), 1)
        try:
            self._recv_bytes(pg, torch.empty(1, dtype=torch.uint8, device=self._dev()))  # warm-up
        except Exception:
            _abort(pg)
            raise
        ctl.set_timeout(self.timeout)
        pair.pg, pair.ctl, pair.pid, pair.seq = pg, ctl, pid, 0

    def _drop_locked(self, pair: _Pair) -> None:
        if pair.pg is not None:
            _abort(pair.pg)
        pair.pg, pair.ctl = None, None

    def _forget(self, key, pair: _Pair) -> None:
        """A failed pair: abort it; the next transfer from this sender pairs anew."""
        self._drop_locked(pair)
        with self._lock:
            if self._pairs.get(key) is pair:
                del self._pairs[key]
