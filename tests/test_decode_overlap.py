"""Overlapped decode steps (EngineConfig.overlap_steps): the next pass is launched before the host reads the
tokens of the one before. Every request must get exactly the tokens, text and finish reason that it gets without
overlap, however it ends (length, stop token, stop string, context limit, abort) and under preemption."""

from __future__ import annotations

import dataclasses

import pytest
from test_engine import (
    PREEMPTION_SAMPLINGS,
    ROOMY,
    Collected,
    _prompts,
    prefill,
    reference_greedy,
    run_decode,
)

from sunray.engine.config import EngineConfig
from sunray.engine.decode_engine import DecodeEngine
from sunray.engine.sequence import SamplingParams

pytestmark = pytest.mark.usefixtures("single_thread")


def _overlapped(config: EngineConfig) -> EngineConfig:
    return dataclasses.replace(config, overlap_steps=True)


def _both(lm, prompts, samplings, config=ROOMY):
    """The same requests through a decode engine without and with overlap: (plain, overlapped) collections."""
    runs = []
    for cfg in (config, _overlapped(config)):
        decode = DecodeEngine(lm, cfg)
        runs.append(run_decode(decode, prefill(lm, prompts, samplings, config=ROOMY)))
        assert decode.stats().kv_blocks_free == decode.blocks.num_blocks
        assert decode._launched is None
    return runs


def _assert_same(plain: dict[str, Collected], overlapped: dict[str, Collected]) -> None:
    assert plain.keys() == overlapped.keys()
    for rid in plain:
        a, b = plain[rid], overlapped[rid]
        assert (b.tokens, b.text, b.finish_reason) == (a.tokens, a.text, a.finish_reason), rid
        assert b.finished_outputs == 1


def test_overlap_gives_the_same_tokens_for_every_way_a_request_ends(tiny_lm, tiny_tokenizer):
    prompts = _prompts(8, seed=21, lengths=[5, 9, 3, 12, 7, 4, 10, 6])
    refs = [reference_greedy(tiny_lm, p, 10) for p in prompts]
    # A stop token that first appears mid-way in request 2's greedy output, and a stop string from request 6's.
    k = next(i for i in range(2, 10) if refs[2][i] not in refs[2][:i])
    stop_text = tiny_tokenizer.decode(refs[6][3:5], skip_special_tokens=True).strip()
    samplings = [
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
        SamplingParams(
            max_tokens=3, temperature=0, ignore_eos=True
        ),  # ends by length right after the hand-off
        SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(refs[2][k],)),
        SamplingParams(max_tokens=14, temperature=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=77),
        SamplingParams(max_tokens=9, temperature=1.2, top_k=5, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0, stop=(stop_text,) if stop_text else ()),
        SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
    ]
    plain, overlapped = _both(tiny_lm, prompts, samplings)
    _assert_same(plain, overlapped)
    assert plain["r2"].finish_reason == "stop" and plain["r2"].tokens == refs[2][: k + 1]
    assert plain["r0"].tokens == refs[0]


def test_overlap_under_preemption_and_the_context_limit(tiny_lm):
    prompts = _prompts(5, seed=8, lengths=[6, 9, 4, 7, 10])
    samplings = PREEMPTION_SAMPLINGS
    tight = EngineConfig(block_size=4, num_kv_blocks=10)  # about 27 blocks wanted: requests get swapped out
    plain, overlapped = _both(tiny_lm, prompts, samplings, tight)
    _assert_same(plain, overlapped)
    roomy, _ = _both(tiny_lm, prompts, samplings)
    _assert_same(roomy, overlapped)
    short = EngineConfig(
        block_size=4, max_model_len=12, num_kv_blocks=64
    )  # 8 + 4 tokens, then the context ends
    plain, overlapped = _both(tiny_lm, prompts[:1] * 1, [SamplingParams(max_tokens=50, temperature=0)], short)
    _assert_same(plain, overlapped)
    assert len(overlapped["r0"].tokens) == 12 - len(prompts[0])


def test_a_step_hands_out_the_pass_before_and_keeps_one_in_flight(tiny_lm):
    prompts = _prompts(2, seed=3, lengths=[5, 8])
    results = prefill(tiny_lm, prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    decode = DecodeEngine(tiny_lm, _overlapped(ROOMY))
    passes = []
    forward = decode.runner.decode
    decode.runner.decode = lambda seqs, prev=None: passes.append(len(seqs)) or forward(seqs, prev)
    collected: dict[str, Collected] = {}
    run_decode(decode, results, collected, max_steps=0)
    assert decode.step() == []  # the first pass is launched; nothing of it is read yet
    assert decode._launched is not None and len(decode._launched.batch) == 2
    outs = decode.step()  # the second pass launched, the first one's tokens handed out
    assert sorted(o.request_id for o in outs) == ["r0", "r1"]
    assert all(o.num_output_tokens == 2 and len(o.new_token_ids) == 1 for o in outs)
    for o in outs:
        collected[o.request_id].add(o)
    run_decode(decode, [], collected)
    for i, p in enumerate(prompts):
        assert collected[f"r{i}"].tokens == reference_greedy(tiny_lm, p, 6)
    # max_tokens 6: one from prefill, five passes; the pass that would make a 7th is never launched.
    assert passes == [2] * 5
    assert not decode.has_unfinished() and decode._launched is None


def test_requests_join_while_a_pass_is_in_flight(tiny_lm):
    prompts = _prompts(4, seed=6, lengths=[5, 9, 3, 12])
    samplings = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (6, 14, 10, 9)]
    results = [prefill(tiny_lm, [p], s, ids=[f"r{i}"])[0] for i, (p, s) in enumerate(zip(prompts, samplings))]
    decode = DecodeEngine(tiny_lm, _overlapped(ROOMY))
    collected: dict[str, Collected] = {}
    run_decode(decode, results[:2], collected, max_steps=0)
    for joining in ([], [], results[2:3], [], [], results[3:]):
        run_decode(decode, joining, collected, max_steps=0)
        for out in decode.step():
            collected[out.request_id].add(out)
    run_decode(decode, [], collected)
    for i, (p, s) in enumerate(zip(prompts, samplings)):
        assert collected[f"r{i}"].tokens == reference_greedy(tiny_lm, p, s.max_tokens)
    assert decode.stats().kv_blocks_free == decode.blocks.num_blocks


def test_abort_while_its_pass_is_in_flight(tiny_lm):
    prompts = _prompts(3, seed=9, lengths=[5, 6, 7])
    results = prefill(tiny_lm, prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    decode = DecodeEngine(tiny_lm, _overlapped(ROOMY))
    collected: dict[str, Collected] = {}
    run_decode(decode, results, collected, max_steps=0)
    for _ in range(3):
        for out in decode.step():
            collected[out.request_id].add(out)
    assert any(s.request_id == "r1" for s in decode._launched.batch)
    assert decode.abort("r1")
    outs = decode.step()
    aborted = [o for o in outs if o.request_id == "r1"]
    # Only the abort: the token of its pass in flight is dropped, not handed out after the abort.
    assert len(aborted) == 1 and aborted[0].finish_reason == "abort" and aborted[0].new_token_ids == []
    assert aborted[0].num_output_tokens == len(collected["r1"].tokens)
    for out in outs:
        collected[out.request_id].add(out)
    run_decode(decode, [], collected)
    assert collected["r1"].finish_reason == "abort"
    for i in (0, 2):
        assert collected[f"r{i}"].tokens == reference_greedy(tiny_lm, prompts[i], 20)
    assert decode.stats().kv_blocks_free == decode.blocks.num_blocks
