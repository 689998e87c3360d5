"""The CUDA IPC KV transport between two processes on one GPU: the receiver sees the sender's KV bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from sunray.engine.handoff import KVHandoff
from sunray.engine.sequence import SamplingParams
from sunray.kv.transport import CudaIPCTransport
from sunray.models.fingerprint import Fingerprint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _receive(payload, results) -> None:
    handoff = CudaIPCTransport().receive(payload)
    kv = handoff.kv.clone()  # copy out while the sender still holds the memory
    results.put(
        (
            handoff.request_id,
            handoff.output_token_ids,
            kv.device.type,
            kv.float().sum().item(),
            kv.view(torch.int16).cpu().numpy().tobytes(),
        )
    )


def test_cuda_ipc_moves_kv_between_processes():
    kv = torch.randn((4, 2, 9, 2, 64), device="cuda").to(torch.bfloat16)
    fp = Fingerprint("arch", "tok", "weights")
    handoff = KVHandoff("r1", "math", fp, list(range(5)), [7, 8, 9, 10, 11], SamplingParams(max_tokens=8), kv)
    payload = CudaIPCTransport().send(handoff)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(target=_receive, args=(payload, results))
    p.start()
    rid, outs, device, total, raw = results.get(timeout=120)
    p.join(timeout=60)
    assert p.exitcode == 0
    assert (rid, outs, device) == ("r1", [7, 8, 9, 10, 11], "cuda")
    assert raw == kv.view(torch.int16).cpu().numpy().tobytes()
    assert total == pytest.approx(kv.float().sum().item())


def test_cuda_ipc_refuses_host_tensors():
    kv = torch.zeros((1, 2, 1, 1, 8))
    handoff = KVHandoff("r", "m", Fingerprint("a", "t", "w"), [1], [2], SamplingParams(), kv)
    with pytest.raises(ValueError, match="GPU tensors only"):
        CudaIPCTransport().send(handoff)
