"""sunray.serve.streams (the ingress side of the decode workers' output streams) and the worker's step-time
record, without Ray: a stand-in worker has the two remote methods the ingress calls."""

from __future__ import annotations

import asyncio

import pytest

from sunray.engine.sequence import RequestOutput
from sunray.serve.decode_worker import StepTimes
from sunray.serve.streams import DecodeStreams


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def options(self, **_):
        return self

    def remote(self, *args):
        return self.fn(*args)


class StandInWorker:
    """What DecodeStreams calls: submit.remote(payload, subscriber) and stream.options(...).remote(subscriber)."""

    def __init__(self) -> None:
        self.items: asyncio.Queue = asyncio.Queue()  # lists of outputs, or an exception that ends the stream
        self.submitted: list[tuple] = []
        self.streams_opened = 0
        self.refuse: Exception | None = None
        self.submit = _Method(self._submit)
        self.stream = _Method(self._stream)

    async def _submit(self, payload, subscriber):
        if self.refuse is not None:
            raise self.refuse
        self.submitted.append((payload, subscriber))
        return payload

    async def _stream(self, subscriber):
        self.streams_opened += 1
        while True:
            item = await self.items.get()
            if isinstance(item, BaseException):
                raise item
            ref = asyncio.get_running_loop().create_future()  # what a streamed ObjectRef resolves to
            ref.set_result(item)
            yield ref


def out(rid: str, token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, "m", [token], str(token), finished, "length" if finished else None, 3, 1)


async def _drain(q: asyncio.Queue, n: int) -> list:
    return [await asyncio.wait_for(q.get(), 2) for _ in range(n)]


def test_outputs_reach_their_request_in_order_over_one_stream():
    async def main():
        w, streams = StandInWorker(), DecodeStreams()
        qa = await streams.submit("w0", w, "payload-a", "a")
        qb = await streams.submit("w0", w, "payload-b", "b")
        assert [s for _, s in w.submitted] == [f"{streams.subscriber}-1"] * 2  # the one stream's name
        await w.items.put([out("a", 1), out("b", 10)])  # one step: one item for both requests
        await w.items.put([out("b", 11, finished=True), out("a", 2)])
        await w.items.put([out("a", 3, finished=True)])
        got_a, got_b = await _drain(qa, 3), await _drain(qb, 2)
        assert [o.new_token_ids[0] for o in got_a] == [1, 2, 3] and got_a[-1].finished
        assert [o.new_token_ids[0] for o in got_b] == [10, 11] and got_b[-1].finished
        assert w.streams_opened == 1  # both requests share the worker's one stream
        streams.close()

    asyncio.run(main())


def test_a_failed_stream_reaches_every_open_request_and_the_next_submit_reopens_it():
    async def main():
        w, streams = StandInWorker(), DecodeStreams()
        qa = await streams.submit("w0", w, "pa", "a")
        qb = await streams.submit("w0", w, "pb", "b")
        await w.items.put([out("a", 1)])
        died = ConnectionError("worker died")
        await w.items.put(died)
        assert (await _drain(qa, 2))[1] is died
        assert (await _drain(qb, 1))[0] is died
        qc = await streams.submit("w0", w, "pc", "c")  # a new stream for a new request
        await w.items.put([out("c", 5, finished=True)])
        assert (await _drain(qc, 1))[0].finished and w.streams_opened == 2
        streams.close()

    asyncio.run(main())


def test_a_refused_submit_leaves_nothing_behind_and_forget_drops_late_outputs():
    async def main():
        w, streams = StandInWorker(), DecodeStreams()
        w.refuse = RuntimeError("overloaded")
        with pytest.raises(RuntimeError, match="overloaded"):
            await streams.submit("w0", w, "pa", "a")
        w.refuse = None
        qb = await streams.submit("w0", w, "pb", "b")
        streams.forget("w0", "b")  # the client went away
        qc = await streams.submit("w0", w, "pc", "c")
        await w.items.put([out("a", 1), out("b", 2), out("c", 3, finished=True)])  # a and b: nobody listens
        assert (await _drain(qc, 1))[0].new_token_ids == [3]
        assert qb.empty()
        streams.close()

    asyncio.run(main())


def test_step_times_by_power_of_two_bucket():
    t = StepTimes()
    for batch, s in ((1, 0.010), (3, 0.012), (2, 0.014), (64, 0.020), (100, 0.030), (0, 1.0)):
        t.add(batch, s)
    summary = t.summary()
    assert list(summary) == ["1", "2", "64"]  # a step with no sequence is not a decode step
    assert summary["2"] == {"steps": 2, "mean_ms": 13.0, "mean_batch": 2.5}
    assert summary["64"] == {"steps": 2, "mean_ms": 25.0, "mean_batch": 82.0}


def test_inbox_skips_an_add_whose_caller_gave_up_and_keeps_the_step_thread_alive():
    """A client that disconnects while its submit is queued cancels the add's future: the add must not run (the
    request would leak), and applying the inbox must not raise (it runs in the step thread, which would die)."""
    from sunray.serve.decode_worker import Inbox

    class Engine:
        def __init__(self):
            self.calls = []

        def add(self, arg):
            self.calls.append(("add", arg))
            if arg == "bad":
                raise ValueError("no room")

        def abort(self, arg):
            self.calls.append(("abort", arg))
            return True

    engine, inbox = Engine(), Inbox()
    gave_up, kept, bad = inbox.post("add", "gone"), inbox.post("add", "kept"), inbox.post("add", "bad")
    abort_gone = inbox.post("abort", "gone")
    gave_up.cancel()
    abort_gone.cancel()  # an abort whose caller also went away still runs
    inbox.apply(engine)
    assert engine.calls == [("add", "kept"), ("add", "bad"), ("abort", "gone")]
    assert kept.result() is None and isinstance(bad.exception(), ValueError)
