"""The KV hand-off wire format and the transports."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch

from sunray.engine.handoff import KVHandoff, KVHandoffError
from sunray.engine.sequence import SamplingParams
from sunray.kv import handoff as wire
from sunray.kv.handoff import MAGIC
from sunray.kv.transport import BytesTransport, InProcessTransport, KVTransport, get_transport
from sunray.models.fingerprint import Fingerprint

pytestmark = pytest.mark.usefixtures("single_thread")

FP = Fingerprint(architecture="a" * 16, tokenizer="b" * 16, weights="c" * 16, quantization="int4-awq-g128")
LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 8


def _handoff(dtype=torch.float32, prompt_len=5, outputs=(42,), **overrides) -> KVHandoff:
    tokens = prompt_len + len(outputs) - 1
    g = torch.Generator().manual_seed(prompt_len)
    kv = torch.randn(LAYERS, 2, tokens, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    kwargs = dict(
        request_id="req-7",
        model="math-sun",
        fingerprint=FP,
        prompt_token_ids=list(range(10, 10 + prompt_len)),
        output_token_ids=list(outputs),
        sampling=SamplingParams(
            max_tokens=33,
            temperature=0.7,
            top_k=5,
            top_p=0.9,
            seed=11,
            stop_token_ids=(3, 4),
            stop=("\n\n", "END"),
        ),
        kv=kv,
        text="héllo ✓",
        detok_offsets=(2, 6),
    )
    kwargs.update(overrides)
    return KVHandoff(**kwargs)


def _assert_same(a: KVHandoff, b: KVHandoff) -> None:
    assert b.request_id == a.request_id and b.model == a.model
    assert b.fingerprint == a.fingerprint and b.fingerprint.digest == a.fingerprint.digest
    assert b.prompt_token_ids == a.prompt_token_ids
    assert b.output_token_ids == a.output_token_ids
    assert b.sampling == a.sampling
    assert b.text == a.text
    assert b.detok_offsets == a.detok_offsets
    assert b.kv.dtype == a.kv.dtype and b.kv.shape == a.kv.shape
    # Bit-exact: compare the raw bytes, not the values (NaN-safe, and -0.0 vs 0.0 counts).
    assert torch.equal(b.kv.contiguous().view(torch.uint8), a.kv.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact(dtype):
    h = _handoff(dtype)
    h.kv[0, 0, 0, 0, :3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)
    data = wire.to_bytes(h)
    assert data.startswith(MAGIC)
    assert len(data) > h.nbytes
    back = wire.from_bytes(data)
    _assert_same(h, back)
    # From a memoryview (what a zero-copy receiver hands over) too.
    _assert_same(h, wire.from_bytes(memoryview(data)))


def test_round_trip_of_non_contiguous_kv_and_no_offsets():
    base = _handoff()
    kv = base.kv.transpose(3, 4).contiguous().transpose(3, 4)  # same values, non-contiguous strides
    assert not kv.is_contiguous()
    h = _handoff(kv=kv, detok_offsets=None, text="")
    back = wire.from_bytes(wire.to_bytes(h))
    assert torch.equal(back.kv, base.kv)
    assert back.detok_offsets is None and back.text == ""


def test_round_trip_with_several_output_tokens():
    h = _handoff(prompt_len=4, outputs=(5, 6, 7))
    assert h.num_kv_tokens == 6
    back = wire.from_bytes(wire.to_bytes(h))
    _assert_same(h, back)


def test_received_kv_is_writable_and_independent_of_the_buffer():
    data = bytearray(wire.to_bytes(_handoff()))
    back = wire.from_bytes(data)
    before = back.kv.clone()
    data[-8:] = b"\xff" * 8  # the sender reusing its buffer must not change the received tensor
    assert torch.equal(back.kv, before)
    back.kv.add_(1.0)  # and the tensor is writable (no warning, no error)


def test_to_sequence_resumes_where_prefill_stopped():
    h = _handoff(outputs=(42, 43))
    seq = h.to_sequence()
    assert seq.request_id == h.request_id and seq.model == h.model
    assert seq.prompt_token_ids == h.prompt_token_ids and seq.output_token_ids == [42, 43]
    assert seq.text == h.text and seq.detok_offsets == (2, 6)
    # Already handed out on the prefill side: not sent again.
    assert seq.emitted_tokens == 2 and seq.emitted_chars == len(h.text)
    assert seq.num_tokens == h.num_kv_tokens + 1


# -- damaged input ---------------------------------------------------------------------------------------------


def _header_len(data: bytes) -> int:
    return struct.unpack_from("<I", data, len(MAGIC))[0]


def test_bad_magic():
    data = bytearray(wire.to_bytes(_handoff()))
    data[0:1] = b"X"
    with pytest.raises(KVHandoffError, match="not a sunray KV hand-off"):
        wire.from_bytes(bytes(data))


def test_other_version():
    data = bytearray(wire.to_bytes(_handoff()))
    data[len(MAGIC) - 1] = 2
    with pytest.raises(KVHandoffError, match="bad magic or version"):
        wire.from_bytes(bytes(data))


@pytest.mark.parametrize("cut", [1, 4, 100])
def test_truncated_payload(cut):
    data = wire.to_bytes(_handoff())
    with pytest.raises(KVHandoffError, match=r"KV payload is \d+ bytes, header says \d+"):
        wire.from_bytes(data[:-cut])


def test_extra_payload():
    data = wire.to_bytes(_handoff())
    with pytest.raises(KVHandoffError, match=r"KV payload is \d+ bytes, header says \d+"):
        wire.from_bytes(data + b"\0\0")


@pytest.mark.parametrize("keep", [0, 3, len(MAGIC), len(MAGIC) + 2, len(MAGIC) + 4, len(MAGIC) + 20])
def test_truncated_before_the_payload(keep):
    """Cut inside the magic, the header length or the header: always a KVHandoffError, never a raw error."""
    data = wire.to_bytes(_handoff())
    assert keep < len(MAGIC) + 4 + _header_len(data)
    message = "not a sunray KV hand-off" if keep < len(MAGIC) else "truncated KV hand-off"
    with pytest.raises(KVHandoffError, match=message):
        wire.from_bytes(data[:keep])


def test_garbage_header():
    data = wire.to_bytes(_handoff())
    hlen = _header_len(data)
    start = len(MAGIC) + 4
    garbage = bytes([0xC1]) * hlen  # 0xc1 is never valid msgpack
    with pytest.raises(KVHandoffError, match="damaged KV hand-off header"):
        wire.from_bytes(data[:start] + garbage + data[start + hlen :])


def _with_header(header, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return MAGIC + struct.pack("<I", len(packed)) + packed + payload


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h: 12345, "damaged KV hand-off header: a msgpack int, not a map"),
        (lambda h: [1, 2, 3], "damaged KV hand-off header: a msgpack list, not a map"),
        (lambda h: {k: v for k, v in h.items() if k != "request_id"}, "field 'request_id' is missing"),
        (lambda h: {k: v for k, v in h.items() if k != "fingerprint"}, "field 'fingerprint' is missing"),
        (lambda h: {k: v for k, v in h.items() if k != "shape"}, "shape None is not a list of sizes"),
        (lambda h: {**h, "shape": "big"}, "shape 'big' is not a list of sizes"),
        (lambda h: {**h, "shape": [3, 2, -1, 2, 8]}, r"shape \[3, 2, -1, 2, 8\] is not a list of sizes"),
        (lambda h: {**h, "shape": [0, 2, -1, 2, 8]}, "is not a list of sizes"),
        (lambda h: {**h, "shape": [3, 2, 5.0, 2, 8]}, "is not a list of sizes"),
        (lambda h: {**h, "fingerprint": "abc"}, "damaged KV hand-off header"),
        (lambda h: {**h, "sampling": {"max_tokens": 0}}, "damaged KV hand-off header: max_tokens must be"),
        (lambda h: {**h, "sampling": {"nonsense": 1}}, "damaged KV hand-off header: .*nonsense"),
        (lambda h: {**h, "prompt_token_ids": 5}, "damaged KV hand-off header"),
    ],
)
def test_malformed_header_fields(mutate, message):
    """A header that is valid msgpack but not a hand-off: always a KVHandoffError that says what is wrong."""
    h = _handoff()
    raw = h.kv.contiguous().view(torch.uint8).numpy().tobytes()
    with pytest.raises(KVHandoffError, match=message):
        wire.from_bytes(_with_header(mutate(wire.header(h)), raw))


def test_unsupported_dtype():
    h = _handoff()
    header = {**wire.header(h), "dtype": "int8"}
    with pytest.raises(KVHandoffError, match="unsupported KV dtype 'int8'"):
        wire.from_bytes(_with_header(header, b""))


def test_header_and_token_ids_disagree():
    h = _handoff(prompt_len=5)
    raw = h.kv.contiguous().view(torch.uint8).numpy().tobytes()
    header = {**wire.header(h), "prompt_token_ids": list(range(7))}
    with pytest.raises(KVHandoffError, match="KV holds 5 tokens, the token ids say 7"):
        wire.from_bytes(_with_header(header, raw))


# -- construction checks ---------------------------------------------------------------------------------------


def test_inconsistent_token_count():
    kv = torch.zeros(LAYERS, 2, 4, KV_HEADS, HEAD_DIM)
    with pytest.raises(KVHandoffError, match="KV holds 4 tokens, the token ids say 5"):
        _handoff(prompt_len=5, outputs=(1,), kv=kv)
    with pytest.raises(KVHandoffError, match="KV holds 4 tokens, the token ids say 6"):
        _handoff(prompt_len=5, outputs=(1, 2), kv=kv)


def test_needs_first_token_and_5d_kv():
    with pytest.raises(KVHandoffError, match="needs the first output token"):
        _handoff(prompt_len=5, outputs=(), kv=torch.zeros(LAYERS, 2, 4, KV_HEADS, HEAD_DIM))
    with pytest.raises(KVHandoffError, match=r"KV must be \[layers, 2, tokens, kv_heads, head_dim\]"):
        _handoff(kv=torch.zeros(LAYERS, 2, 5, KV_HEADS * HEAD_DIM))
    with pytest.raises(KVHandoffError, match=r"KV must be \[layers, 2, tokens, kv_heads, head_dim\]"):
        _handoff(kv=torch.zeros(LAYERS, 3, 5, KV_HEADS, HEAD_DIM))


# -- transports ------------------------------------------------------------------------------------------------


def test_in_process_transport_moves_the_object():
    h = _handoff()
    t = InProcessTransport()
    got = t.receive(t.send(h))
    assert got is h


def test_bytes_transport_goes_through_the_wire_format():
    h = _handoff(torch.bfloat16)
    t = BytesTransport()
    ref = t.send(h)
    assert isinstance(ref, bytes) and ref.startswith(MAGIC)
    got = t.receive(ref)
    assert got is not h and got.kv.data_ptr() != h.kv.data_ptr()
    _assert_same(h, got)


def test_get_transport():
    assert isinstance(get_transport("inprocess"), InProcessTransport)
    assert isinstance(get_transport("bytes"), BytesTransport)
    assert all(isinstance(get_transport(n), KVTransport) for n in ("inprocess", "bytes"))
    with pytest.raises(
        ValueError, match=r"unknown KV transport 'carrier-pigeon'; available: inprocess, bytes"
    ):
        get_transport("carrier-pigeon")


def test_fingerprint_round_trip_and_differences():
    other = Fingerprint(architecture="a" * 16, tokenizer="b" * 16, weights="d" * 16)
    assert Fingerprint.from_dict(FP.to_dict()) == FP
    diff = FP.differences(other)
    assert diff == ["weights: " + "c" * 16 + " != " + "d" * 16, "quantization: int4-awq-g128 != none"]
    assert FP.digest != other.digest and len(FP.digest) == 16
