"""The engine end to end on a tiny random Llama: prefill + decode against an independent reference, the hand-off
checks, continuous batching, preemption, abort, capacity and prompt errors, seeds, and LocalSUN."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from conftest import EOS_ID

from sunray.engine.attention import get_backend
from sunray.engine.block_manager import BlockManager
from sunray.engine.config import EngineConfig
from sunray.engine.decode_engine import DecodeEngine, KVCapacityError
from sunray.engine.handoff import KVHandoff, KVHandoffError
from sunray.engine.kv_cache import PagedKVCache
from sunray.engine.local import LocalSUN
from sunray.engine.model_runner import ModelRunner
from sunray.engine.prefill_engine import PrefillEngine, PrefillRequest, PromptError
from sunray.engine.sequence import SamplingParams, Sequence
from sunray.kv.transport import BytesTransport
from sunray.models.loader import wrap_model

pytestmark = pytest.mark.usefixtures("single_thread")

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# A decode pool that holds everything these tests send (the default 256 MiB would cost a large zeroed allocation).
ROOMY = EngineConfig(block_size=4, num_kv_blocks=256)


# -- an independent reference: dense attention, full recomputation, no cache ------------------------------------


class RefAttention:
    """Plain causal attention in float32 over [prefix KV] + the new tokens. Records each layer's new k/v.

    With no prefix this is an ordinary causal LM forward; with the prompt KV of a prefill module as the prefix it is
    the SUN decode module's view (docs/sun-training.md): D attends over P's prompt KV plus its own KV of generated tokens.
    """

    def __init__(self, prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.prefix = prefix or {}
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, layer, q, k, v, scale, ctx):
        self.kv[layer] = (k, v)
        if layer in self.prefix:
            k = torch.cat([self.prefix[layer][0], k])
            v = torch.cat([self.prefix[layer][1], v])
        t, s = q.shape[0], k.shape[0]
        rep = q.shape[1] // k.shape[1]  # grouped-query attention: query head h reads kv head h // rep
        k, v = k.repeat_interleave(rep, dim=1).float(), v.repeat_interleave(rep, dim=1).float()
        scores = torch.einsum("thd,shd->hts", q.float(), k) * scale
        allowed = torch.arange(s)[None, :] <= (s - t + torch.arange(t))[:, None]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("hts,shd->thd", probs, v).to(q.dtype)


@torch.inference_mode()
def _ref_forward(lm, ids: list[int], start: int, backend: RefAttention) -> torch.Tensor:
    """Logits of the last of `ids`, placed at positions start, start + 1, ..."""
    hidden = lm.model(
        torch.tensor(ids), torch.arange(start, start + len(ids)), SimpleNamespace(backend=backend)
    )
    return lm.model.compute_logits(hidden[-1]).float()


def reference_greedy(lm, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by recomputing the whole sequence from scratch at every step."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_ref_forward(lm, ids, 0, RefAttention()).argmax()))
    return ids[len(prompt) :]


def reference_sun_greedy(prefill_lm, decode_lm, prompt: list[int], n: int) -> list[int]:
    """SUN by definition: P runs the prompt and picks token 1; D picks the rest over P's prompt KV and its own KV."""
    ref = RefAttention()
    out = [int(_ref_forward(prefill_lm, prompt, 0, ref).argmax())]
    prompt_kv = dict(ref.kv)
    while len(out) < n:
        out.append(int(_ref_forward(decode_lm, out, len(prompt), RefAttention(prompt_kv)).argmax()))
    return out


# -- drivers ---------------------------------------------------------------------------------------------------


def _prompts(n: int, seed: int = 0, lengths=None) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = lengths or [rng.randint(1, 14) for _ in range(n)]
    return [[rng.randrange(3, 256) for _ in range(k)] for k in lengths]


class Collected:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.finished_outputs = 0

    def add(self, out) -> None:
        assert self.finish_reason is None, f"output after finish: {out}"
        self.tokens += out.new_token_ids
        self.text += out.new_text
        if out.finished:
            self.finish_reason = out.finish_reason
            self.finished_outputs += 1
        assert out.num_output_tokens == len(self.tokens)


def prefill(lm, prompts, sampling, ids=None, config=None, name="default"):
    engine = PrefillEngine(lm, config or ROOMY, name=name)
    ids = ids or [f"r{i}" for i in range(len(prompts))]
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    reqs = [PrefillRequest(i, p, s) for i, p, s in zip(ids, prompts, samplings)]
    return engine.prefill(reqs)


def run_decode(decode: DecodeEngine, results, collected=None, max_steps=2000) -> dict[str, Collected]:
    """Add the prefill results to `decode` and step it until everything finished."""
    collected = collected if collected is not None else {}
    for r in results:
        collected.setdefault(r.output.request_id, Collected()).add(r.output)
        if r.handoff is not None:
            decode.add(r.handoff)
    for _ in range(max_steps):
        if not decode.has_unfinished():
            break
        for out in decode.step():
            collected[out.request_id].add(out)
    if max_steps:
        assert not decode.has_unfinished(), "the decode engine did not finish"
    return collected


def generate(
    prefill_lm, decode_lm, prompts, sampling, config=None, decode_config=None
) -> dict[str, Collected]:
    config = config or ROOMY
    decode = DecodeEngine(decode_lm, decode_config or config)
    out = run_decode(decode, prefill(prefill_lm, prompts, sampling, config=config))
    assert decode.stats().kv_blocks_free == decode.blocks.num_blocks
    return out


def sun_variant(base, other, tokenizer):
    """A 'fine-tuned' prefill module: other weights, but it names `base` as its base (as a SUN manifest does)."""
    return wrap_model(other.model, tokenizer, manifest={"base_fingerprint": base.fingerprint.to_dict()})


# -- correctness against the reference -------------------------------------------------------------------------


def test_reference_is_sane(make_lm):
    """The reference itself: SUN with P == D is plain greedy decoding, and the context matters."""
    lm = make_lm(0)
    prompt = [5, 6, 7, 8, 9]
    assert reference_sun_greedy(lm, lm, prompt, 6) == reference_greedy(lm, prompt, 6)
    # The first prompt token changes what comes out: tests below would notice KV that is lost or misplaced.
    assert reference_greedy(lm, [50] + prompt[1:], 6) != reference_greedy(lm, prompt, 6)


def test_prefill_then_decode_matches_reference(tiny_lm, tiny_tokenizer):
    # Lengths around the block size (4) so prompts end inside, at, and just past block boundaries.
    prompts = _prompts(7, lengths=[1, 3, 4, 5, 8, 9, 17])
    got = generate(tiny_lm, tiny_lm, prompts, GREEDY)
    for i, p in enumerate(prompts):
        c = got[f"r{i}"]
        assert c.tokens == reference_greedy(tiny_lm, p, GREEDY.max_tokens), f"prompt {i} (length {len(p)})"
        assert c.finish_reason == "length" and c.finished_outputs == 1
        assert c.text == tiny_tokenizer.decode(c.tokens, skip_special_tokens=True)


def test_sun_prefill_module_with_other_weights_matches_reference(make_lm, tiny_tokenizer):
    """The SUN contract: token 1 from P's logits, tokens 2.. from D attending to P's prompt KV."""
    base, tuned = make_lm(0), sun_variant(make_lm(0), make_lm(3), tiny_tokenizer)
    assert tuned.fingerprint == base.fingerprint
    prompts = _prompts(4, seed=1)
    got = generate(tuned, base, prompts, GREEDY)
    for i, p in enumerate(prompts):
        expected = reference_sun_greedy(tuned, base, p, GREEDY.max_tokens)
        assert got[f"r{i}"].tokens == expected
        # and it is neither model alone (else the test could not tell who did what)
        assert expected != reference_greedy(base, p, GREEDY.max_tokens)
        assert expected != reference_greedy(tuned, p, GREEDY.max_tokens)


def test_prefill_over_several_forward_passes(tiny_lm):
    """A token budget smaller than the batch splits it into several passes; results stay in request order."""
    prompts = _prompts(6, seed=2, lengths=[7, 3, 9, 2, 8, 5])
    config = EngineConfig(block_size=4, max_num_batched_tokens=10)
    engine = PrefillEngine(tiny_lm, config)
    passes = []
    run = engine.runner.prefill
    engine.runner.prefill = lambda seqs, starts: (
        passes.append([s.num_tokens for s in seqs]) or run(seqs, starts)
    )
    results = engine.prefill([PrefillRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    assert passes == [[7, 3], [9], [2, 8], [5]]  # greedy packing under 10 tokens a pass, in order
    assert [r.output.request_id for r in results] == [f"r{i}" for i in range(6)]
    for r, p in zip(results, prompts):
        assert r.output.new_token_ids == reference_greedy(tiny_lm, p, 1)
        assert r.handoff.num_kv_tokens == len(p)
    # The prompt KV equals the reference's per-layer k/v (post-RoPE), position by position.
    ref = RefAttention()
    _ref_forward(tiny_lm, prompts[2], 0, ref)
    kv = results[2].handoff.kv
    for layer, (k, v) in ref.kv.items():
        torch.testing.assert_close(kv[layer, 0], k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kv[layer, 1], v, atol=1e-5, rtol=1e-5)


def test_prefill_many_short_prompts_fit_the_scratch_pool(tiny_lm):
    """Each sequence takes whole KV blocks: a pass holds no more sequences than the scratch pool has blocks."""
    prompts = _prompts(20, seed=3, lengths=[2] * 20)  # 40 tokens fit the token budget, 20 blocks do not fit 6
    config = EngineConfig(block_size=16, max_num_batched_tokens=64, max_model_len=32)
    engine = PrefillEngine(tiny_lm, config)
    assert engine.blocks.num_blocks == 6
    passes = []
    run = engine.runner.prefill
    engine.runner.prefill = lambda seqs, starts: passes.append(len(seqs)) or run(seqs, starts)
    results = engine.prefill([PrefillRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    assert passes == [6, 6, 6, 2]
    assert [r.output.request_id for r in results] == [f"r{i}" for i in range(20)]
    for r, p in zip(results[:3], prompts):
        assert r.output.new_token_ids == reference_greedy(tiny_lm, p, 1)


def test_warm_up_runs_every_batch_shape_and_leaves_the_engine_as_it_was(tiny_lm):
    """warm_up covers one prompt, a long one, equal lengths (SDPA's batched call) and mixed lengths, within the
    engine's limits; afterwards every scratch block is free and real prompts give the reference's tokens."""
    config = EngineConfig(block_size=4, max_num_batched_tokens=64, max_model_len=48)
    engine = PrefillEngine(tiny_lm, config)
    passes = []
    run = engine.runner.prefill
    engine.runner.prefill = lambda seqs, starts: (
        passes.append([s.num_tokens for s in seqs]) or run(seqs, starts)
    )
    free = engine.blocks.num_free_blocks
    ran = engine.warm_up()
    assert passes == [[17], [23], [7, 7, 7], [11, 5]]  # long = min(256, min(47, 64) // 2) = 23
    assert ran == sum(map(sum, passes))
    assert engine.blocks.num_free_blocks == free
    prompts = _prompts(3, seed=5, lengths=[5, 9, 3])
    results = engine.prefill([PrefillRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    for r, p in zip(results, prompts):
        assert r.output.new_token_ids == reference_greedy(tiny_lm, p, 1)


def test_model_runner_logits_with_cached_prefix(tiny_lm):
    """ModelRunner on the paged cache: prefill in two chunks (the second attends to the first's cached KV), in a
    batch with a fresh sequence, then decode steps; every logits row matches the dense reference."""
    cache = PagedKVCache(tiny_lm.config, 12, 4, torch.float32, "cpu")
    blocks = BlockManager(12, 4)
    runner = ModelRunner(tiny_lm.model, cache, get_backend("torch"))
    long, short = _prompts(2, seed=14, lengths=[11, 6])
    a = Sequence("a", long[:5], GREEDY)
    b = Sequence("b", short, GREEDY)
    a.block_table, b.block_table = blocks.allocate(16), blocks.allocate(12)
    blocks.allocate(4)  # a hole between the tables, so that slots are not simply contiguous
    logits = runner.prefill([a], [0])
    torch.testing.assert_close(
        logits[0], _ref_forward(tiny_lm, long[:5], 0, RefAttention()), atol=1e-5, rtol=1e-5
    )
    a.prompt_token_ids = list(long)  # the rest of the prompt, on top of the 5 cached positions
    logits = runner.prefill([a, b], [5, 0])
    torch.testing.assert_close(
        logits[0], _ref_forward(tiny_lm, long, 0, RefAttention()), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        logits[1], _ref_forward(tiny_lm, short, 0, RefAttention()), atol=1e-5, rtol=1e-5
    )
    for token in (7, 8, 9):
        for s in (a, b):
            s.output_token_ids.append(token)
        logits = runner.decode([a, b])
        for row, s in zip(logits, (a, b)):
            expected = _ref_forward(tiny_lm, s.all_token_ids(), 0, RefAttention())
            torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)


def test_handoff_over_bytes_gives_the_same_tokens(tiny_lm):
    prompts = _prompts(3, seed=3)
    results = prefill(tiny_lm, prompts, GREEDY)
    t = BytesTransport()
    for r in results:
        r.handoff = t.receive(t.send(r.handoff))
    got = run_decode(DecodeEngine(tiny_lm, ROOMY), results)
    for i, p in enumerate(prompts):
        assert got[f"r{i}"].tokens == reference_greedy(tiny_lm, p, GREEDY.max_tokens)


def test_stop_token_and_first_token_finish(tiny_lm):
    prompt = _prompts(1, seed=4, lengths=[6])[0]
    ref = reference_greedy(tiny_lm, prompt, 8)
    # Stop at the 4th generated token (the first occurrence of that token).
    k = next(i for i in range(1, 8) if ref[i] not in ref[:i])
    got = generate(
        tiny_lm, tiny_lm, [prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(ref[k],))
    )
    assert got["r0"].tokens == ref[: k + 1] and got["r0"].finish_reason == "stop"
    # max_tokens=1: done at prefill, no hand-off at all.
    results = prefill(tiny_lm, [prompt], SamplingParams(max_tokens=1, temperature=0))
    assert results[0].handoff is None
    assert results[0].output.finished and results[0].output.finish_reason == "length"
    assert results[0].output.new_token_ids == ref[:1]


def test_context_length_limit(tiny_lm):
    config = EngineConfig(block_size=4, max_model_len=12, num_kv_blocks=64)
    prompt = _prompts(1, seed=5, lengths=[8])[0]
    got = generate(
        tiny_lm, tiny_lm, [prompt], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), config
    )
    assert got["r0"].finish_reason == "length"
    assert len(got["r0"].tokens) == 4  # 8 + 4 = 12 tokens
    assert got["r0"].tokens == reference_greedy(tiny_lm, prompt, 4)


# -- the decode engine refuses KV it cannot use ----------------------------------------------------------------


def test_decode_refuses_another_base(make_lm):
    other, mine = make_lm(1), make_lm(0)
    assert other.fingerprint != mine.fingerprint
    (result,) = prefill(other, [[5, 6, 7]], GREEDY)
    decode = DecodeEngine(mine, ROOMY)
    with pytest.raises(KVHandoffError) as e:
        decode.add(result.handoff)
    msg = str(e.value)
    assert other.fingerprint.digest in msg and mine.fingerprint.digest in msg
    assert "weights" in msg and "r0" in msg
    assert not decode.has_unfinished() and decode.stats().kv_blocks_free == decode.blocks.num_blocks


def test_decode_refuses_wrong_dtype(make_lm):
    bf16, f32 = make_lm(0, torch.bfloat16), make_lm(0)
    assert bf16.fingerprint == f32.fingerprint  # same base, only the KV dtype differs
    (result,) = prefill(bf16, [[5, 6, 7]], GREEDY)
    decode = DecodeEngine(f32, ROOMY)
    with pytest.raises(KVHandoffError, match=r"KV dtype bfloat16 != decode module dtype float32"):
        decode.add(result.handoff)
    assert not decode.has_unfinished()


@pytest.mark.parametrize(
    "shape",
    [
        (1, 2, 3, 2, 16),  # too few layers
        (2, 2, 3, 1, 16),  # too few kv heads
        (2, 2, 3, 2, 8),  # wrong head dim
    ],
)
def test_decode_refuses_wrong_shape(tiny_lm, shape):
    (result,) = prefill(tiny_lm, [[5, 6, 7]], GREEDY)
    h = result.handoff
    assert tuple(h.kv.shape) == (2, 2, 3, 2, 16)
    bad = KVHandoff(
        h.request_id,
        h.model,
        h.fingerprint,
        h.prompt_token_ids,
        h.output_token_ids,
        h.sampling,
        torch.zeros(shape),
    )
    decode = DecodeEngine(tiny_lm, ROOMY)
    with pytest.raises(KVHandoffError, match=r"KV shape \(.*\) != \(2, 2, 3, 2, 16\)"):
        decode.add(bad)
    decode.add(h)  # the good one is still welcome


def test_decode_refuses_duplicate_request_id(tiny_lm):
    (result,) = prefill(tiny_lm, [[5, 6, 7]], GREEDY)
    decode = DecodeEngine(tiny_lm, ROOMY)
    decode.add(result.handoff)
    with pytest.raises(KVHandoffError, match="already in this decode engine"):
        decode.add(result.handoff)


# -- continuous batching ---------------------------------------------------------------------------------------


def test_requests_join_and_leave_between_steps(tiny_lm):
    config = ROOMY
    prompts = _prompts(4, seed=6, lengths=[5, 9, 3, 12])
    max_tokens = [6, 14, 10, 9]
    samplings = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
    results = [
        prefill(tiny_lm, [p], s, ids=[f"r{i}"], config=config)[0]
        for i, (p, s) in enumerate(zip(prompts, samplings))
    ]
    decode = DecodeEngine(tiny_lm, config)
    collected: dict[str, Collected] = {}
    running_counts = []

    def step():
        for out in decode.step():
            collected[out.request_id].add(out)
        running_counts.append(decode.stats().num_running)

    run_decode(decode, results[:2], collected, max_steps=0)  # r0, r1 start together
    step()
    step()
    run_decode(decode, results[2:3], collected, max_steps=0)  # r2 joins while r0 and r1 are mid-generation
    for _ in range(4):
        step()
    assert collected["r0"].finish_reason == "length"  # r0 left after 6 tokens ...
    run_decode(decode, results[3:], collected, max_steps=0)  # ... and r3 takes its place
    run_decode(decode, [], collected)
    assert 3 in running_counts and running_counts[:2] == [2, 2]
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        alone = generate(tiny_lm, tiny_lm, [p], samplings[i])["r0"]
        assert collected[f"r{i}"].tokens == alone.tokens == reference_greedy(tiny_lm, p, m)
        assert collected[f"r{i}"].text == alone.text
    assert decode.stats().kv_blocks_free == decode.blocks.num_blocks


def test_max_num_seqs_queues_the_rest(tiny_lm):
    config = EngineConfig(block_size=4, max_num_seqs=2, num_kv_blocks=64)
    prompts = _prompts(5, seed=7)
    decode = DecodeEngine(tiny_lm, config)
    results = prefill(tiny_lm, prompts, GREEDY, config=config)
    collected: dict[str, Collected] = {}
    run_decode(decode, results, collected, max_steps=0)
    for out in decode.step():
        collected[out.request_id].add(out)
    assert decode.stats().num_running == 2 and decode.stats().num_waiting == 3
    run_decode(decode, [], collected)
    for i, p in enumerate(prompts):
        assert collected[f"r{i}"].tokens == reference_greedy(tiny_lm, p, GREEDY.max_tokens)


# -- preemption ------------------------------------------------------------------------------------------------


# Five requests that need about 27 KV blocks of 4 tokens together: greedy and seeded, of different lengths.
PREEMPTION_SAMPLINGS = [
    SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=14, temperature=0.9, seed=5, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=77, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
]


def test_preemption_when_kv_runs_out(tiny_lm):
    prompts = _prompts(5, seed=8, lengths=[6, 9, 4, 7, 10])
    samplings = PREEMPTION_SAMPLINGS
    roomy = generate(tiny_lm, tiny_lm, prompts, samplings)
    # Each request needs 5-6 blocks of 4 tokens; together about 27. Ten blocks fit one or two at a time.
    tight_config = EngineConfig(block_size=4, num_kv_blocks=10)
    decode = DecodeEngine(tiny_lm, tight_config)
    results = prefill(tiny_lm, prompts, samplings, config=ROOMY)
    max_used = 0
    collected: dict[str, Collected] = {}
    run_decode(decode, results, collected, max_steps=0)
    for steps in range(1, 500):
        if not decode.has_unfinished():
            break
        for out in decode.step():
            collected[out.request_id].add(out)
        if collected["r0"].finish_reason is None:
            # The newest request is swapped out first: the oldest one never waits.
            assert [s.request_id for s in decode.running][:1] == ["r0"]
            assert len(collected["r0"].tokens) == steps + 1
        stats = decode.stats()
        assert stats.kv_blocks_used + stats.kv_blocks_free == 10
        max_used = max(max_used, stats.kv_blocks_used)
    assert not decode.has_unfinished()
    stats = decode.stats()
    assert stats.num_preemptions > 0
    assert stats.kv_blocks_free == decode.blocks.num_blocks == 10
    assert stats.num_running == 0 and stats.num_waiting == 0
    for i in range(len(prompts)):
        c = collected[f"r{i}"]
        assert c.tokens == roomy[f"r{i}"].tokens, f"request {i} changed under preemption"
        assert c.text == roomy[f"r{i}"].text
        assert c.finish_reason == "length" and len(c.tokens) == samplings[i].max_tokens
    for i in (0, 2, 4):
        assert roomy[f"r{i}"].tokens == reference_greedy(tiny_lm, prompts[i], samplings[i].max_tokens)


# -- abort -----------------------------------------------------------------------------------------------------


def test_abort_running_and_waiting(tiny_lm):
    config = EngineConfig(block_size=4, max_num_seqs=2, num_kv_blocks=64)
    prompts = _prompts(4, seed=9, lengths=[5, 6, 7, 8])
    decode = DecodeEngine(tiny_lm, config)
    results = prefill(
        tiny_lm, prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), config=config
    )
    collected: dict[str, Collected] = {}
    run_decode(decode, results, collected, max_steps=0)
    for _ in range(3):
        for out in decode.step():
            collected[out.request_id].add(out)
    assert [s.request_id for s in decode.running] == ["r0", "r1"]
    assert [w.seq.request_id for w in decode.waiting] == ["r2", "r3"]
    used = decode.stats().kv_blocks_used
    assert decode.abort("r0")  # running
    assert decode.stats().kv_blocks_used < used  # its blocks come back at once
    assert decode.abort("r3")  # waiting
    assert not decode.abort("r3") and not decode.abort("nope")
    assert not decode.has_request("r0") and not decode.has_request("r3")
    assert decode.has_unfinished()
    outs = decode.step()
    aborted = {o.request_id: o for o in outs if o.finish_reason == "abort"}
    assert set(aborted) == {"r0", "r3"}
    assert all(o.finished and o.new_token_ids == [] and o.new_text == "" for o in aborted.values())
    assert aborted["r0"].num_output_tokens == 4 and aborted["r3"].num_output_tokens == 1
    for out in outs:
        collected[out.request_id].add(out)
    # Abort everything that is left, wherever it is.
    assert decode.abort("r1") and decode.abort("r2")
    assert decode.stats().kv_blocks_free == decode.blocks.num_blocks
    outs = decode.step()
    assert sorted(o.request_id for o in outs) == ["r1", "r2"]
    assert all(o.finish_reason == "abort" for o in outs)
    assert not decode.has_unfinished()
    assert decode.step() == []
    assert decode.stats().kv_blocks_free == decode.blocks.num_blocks


def test_abort_a_preempted_request(tiny_lm):
    decode = DecodeEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=8))
    prompts = _prompts(3, seed=10, lengths=[8, 8, 8])
    results = prefill(tiny_lm, prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    collected: dict[str, Collected] = {}
    run_decode(decode, results, collected, max_steps=0)
    for _ in range(40):
        for out in decode.step():
            collected[out.request_id].add(out)
        if decode.num_preemptions:
            break
    assert decode.num_preemptions > 0
    victim = decode.waiting[0].seq.request_id
    assert decode.abort(victim)
    run_decode(decode, [], collected)
    assert collected[victim].finish_reason == "abort"
    assert decode.stats().kv_blocks_free == 8


# -- capacity and prompt errors --------------------------------------------------------------------------------


def test_request_that_can_never_fit(tiny_lm):
    decode = DecodeEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=4))
    (result,) = prefill(tiny_lm, [list(range(3, 13))], SamplingParams(max_tokens=20, temperature=0))
    with pytest.raises(KVCapacityError, match=r"request r0 may need 8 KV blocks; this worker has 4"):
        decode.add(result.handoff)
    assert not decode.has_unfinished()
    # One that fits alone (10 + 6 tokens = 4 blocks) is accepted and finishes.
    (result,) = prefill(
        tiny_lm, [list(range(3, 13))], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    )
    got = run_decode(decode, [result])
    assert len(got["r0"].tokens) == 6


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], r"the prompt is empty"),
        (
            list(range(3, 19)),
            r"maximum context length is 16 tokens; the prompt has 16 tokens and leaves no room",
        ),
        ([5, 256, 7], r"token ids outside the vocabulary \[0, 256\): \[256\]"),
        ([5, -1, 300], r"token ids outside the vocabulary \[0, 256\): \[-1, 300\]"),
    ],
)
def test_bad_prompts(tiny_lm, prompt, message):
    engine = PrefillEngine(tiny_lm, EngineConfig(block_size=4, max_model_len=16))
    good = PrefillRequest("good", [5, 6, 7], GREEDY)
    with pytest.raises(PromptError, match=message):
        engine.prefill([good, PrefillRequest("bad", prompt, GREEDY)])
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    (ok,) = engine.prefill([good])  # the engine is still usable
    assert ok.output.new_token_ids == reference_greedy(tiny_lm, [5, 6, 7], 1)


def test_local_sun_rejects_a_bad_request_without_losing_others(tiny_lm):
    """LocalSUN refuses at add_request what step() could not take; the other requests carry on untouched."""
    sun = LocalSUN(tiny_lm, {"a": tiny_lm}, EngineConfig(block_size=4, max_model_len=16, num_kv_blocks=3))
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    good = sun.add_request([5, 6, 7], sampling, request_id="good")
    with pytest.raises(ValueError, match="request id 'good' is already in use"):
        sun.add_request([5, 6], GREEDY, request_id="good")
    with pytest.raises(KVCapacityError, match="may need 4 KV blocks; this worker has 3"):
        sun.add_request(list(range(3, 13)), GREEDY)
    with pytest.raises(PromptError, match="the prompt is empty"):
        sun.add_request([], GREEDY)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        sun.add_request([5, 999], GREEDY)
    with pytest.raises(KeyError, match="unknown model 'zzz'; loaded: a"):
        sun.add_request([5], GREEDY, model="zzz")
    tokens = []
    for out in sun.stream():
        assert out.request_id == good
        tokens += out.new_token_ids
        if sun.decode.has_request(good):
            with pytest.raises(ValueError, match="already in use"):
                sun.add_request([5, 6], GREEDY, request_id="good")
    assert tokens == reference_greedy(tiny_lm, [5, 6, 7], 8)


# -- seeds -----------------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_across_runs_and_batches(tiny_lm):
    prompt = _prompts(1, seed=11, lengths=[7])[0]
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    config = ROOMY

    def run_alone():
        sun = LocalSUN(tiny_lm, {"a": tiny_lm}, config)
        return sun.generate([prompt], seeded)[0]

    first, second = run_alone(), run_alone()
    assert first.token_ids == second.token_ids and len(first.token_ids) == 16
    # In a batch, after other requests, next to an unseeded and a differently seeded one, with a different model name.
    sun = LocalSUN(tiny_lm, {"a": tiny_lm, "b": tiny_lm}, config)
    others = _prompts(3, seed=12)
    batch = sun.generate(
        others + [prompt],
        [
            SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True),
            SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True),
            SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
            seeded,
        ],
        model=["a", "b", "a", "b"],
    )
    assert batch[3].token_ids == first.token_ids
    assert batch[3].text == first.text
    # Another seed gives another sequence (near-flat distributions over 256 tokens).
    other_seed = LocalSUN(tiny_lm, {"a": tiny_lm}, config).generate(
        [prompt], SamplingParams(max_tokens=16, temperature=1.0, seed=1235, ignore_eos=True)
    )[0]
    assert other_seed.token_ids != first.token_ids
    # And sampling really samples: not the greedy sequence.
    assert first.token_ids != reference_greedy(tiny_lm, prompt, 16)


# -- LocalSUN --------------------------------------------------------------------------------------------------


def test_local_sun_add_model_refuses_another_base(make_lm, tiny_tokenizer):
    base = make_lm(0)
    sun = LocalSUN(base, {"a": base}, ROOMY)
    with pytest.raises(ValueError, match=r"prefill module 'math' was built for another base .*weights: "):
        sun.add_model("math", make_lm(1))
    assert "math" not in sun.prefill
    with pytest.raises(ValueError, match="another base"):
        LocalSUN(base, {"a": base, "bad": make_lm(2)}, ROOMY)
    with pytest.raises(ValueError, match="at least one prefill module"):
        LocalSUN(base, {}, ROOMY)
    sun.add_model("tuned", sun_variant(base, make_lm(1), tiny_tokenizer))  # names the right base: accepted
    assert "tuned" in sun.prefill


def test_local_sun_generate_and_stream(make_lm, tiny_tokenizer):
    base = make_lm(0)
    tuned = sun_variant(base, make_lm(4), tiny_tokenizer)
    sun = LocalSUN(base, {"base": base, "tuned": tuned}, ROOMY, transport=BytesTransport())
    prompts = _prompts(4, seed=13)
    models = ["base", "tuned", "tuned", "base"]
    out = sun.generate(prompts, GREEDY, model=models)
    for c, p, m in zip(out, prompts, models):
        expected = reference_sun_greedy(tuned if m == "tuned" else base, base, p, GREEDY.max_tokens)
        assert c.token_ids == expected and c.model == m
        assert c.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)
        assert c.finish_reason == "length" and c.num_prompt_tokens == len(p)
    assert not sun.has_unfinished()
    assert sun.decode.stats().kv_blocks_free == sun.decode.blocks.num_blocks


def test_local_sun_abort(tiny_lm):
    sun = LocalSUN(tiny_lm, {"a": tiny_lm}, ROOMY)
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    running = sun.add_request([5, 6, 7], long)
    sun.step()
    pending = sun.add_request([8, 9], long)  # not prefilled yet
    assert sun.abort(pending) and sun.abort(running)
    assert not sun.abort("nope")
    outs = sun.step()
    assert {o.request_id: o.finish_reason for o in outs} == {running: "abort", pending: "abort"}
    assert not sun.has_unfinished()
    assert sun.decode.stats().kv_blocks_free == sun.decode.blocks.num_blocks


def test_eos_finishes_a_request(tiny_lm):
    """EOS on the decode side: the request stops at its second token with 'stop', and EOS adds no text."""
    base = tiny_lm
    prompt = [5, 6, 7]
    first = reference_greedy(base, prompt, 1)[0]
    assert first != EOS_ID
    assert base.config.eos_token_ids == (EOS_ID,)
    # A random model seldom picks EOS: declare every token an end-of-sequence token on the decode side only.
    sun = LocalSUN(base, {"a": base}, ROOMY)
    sun.decode.outputs.eos_token_ids = frozenset(range(256))
    (c,) = sun.generate([prompt], SamplingParams(max_tokens=10, temperature=0))
    assert c.finish_reason == "stop" and len(c.token_ids) == 2
    assert c.text == sun.tokenizer.decode([first])
    (c,) = sun.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert c.finish_reason == "length" and len(c.token_ids) == 4


# -- pieces: the paged cache, the config, the backend registry, bfloat16 -----------------------------------------


def test_paged_kv_cache_read_write_round_trip(tiny_model_config):
    cache = PagedKVCache(tiny_model_config, 6, 4, torch.float32, "cpu")
    table = [4, 1, 3]  # a sequence's blocks, out of order
    slots = cache.slots(table, 0, 10)
    assert slots == [16, 17, 18, 19, 4, 5, 6, 7, 12, 13]
    kv = torch.randn(2, 2, 10, 2, 16)
    cache.write(torch.tensor(slots), kv)
    assert torch.equal(cache.read(torch.tensor(slots)), kv)
    # Position 5 of the sequence lives in block 1 at offset 1, in every layer.
    assert torch.equal(cache.k[1, 1, 1], kv[1, 0, 5]) and torch.equal(cache.v[0, 1, 1], kv[0, 1, 5])
    assert cache.k[:, 0].abs().sum() == 0  # untouched blocks stay zero
    k_flat, _ = cache.flat(1)
    assert torch.equal(k_flat[slots[7]], kv[1, 0, 7])
    bytes_per_block = tiny_model_config.kv_bytes_per_token(torch.float32) * 4
    assert (
        PagedKVCache.num_blocks_for_budget(tiny_model_config, 4, torch.float32, 10 * bytes_per_block + 1)
        == 10
    )
    assert PagedKVCache.num_blocks_for_budget(tiny_model_config, 4, torch.float32, 1) == 1
    with pytest.raises(ValueError, match=r"num_blocks \(0\) and block_size \(4\) must be positive"):
        PagedKVCache(tiny_model_config, 0, 4, torch.float32, "cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 0}, "EngineConfig.block_size must be positive, got 0"),
        ({"max_num_seqs": -1}, "EngineConfig.max_num_seqs must be positive, got -1"),
        ({"max_num_batched_tokens": 0}, "EngineConfig.max_num_batched_tokens must be positive"),
        ({"kv_cache_bytes": 0}, "EngineConfig.kv_cache_bytes must be positive"),
        ({"num_kv_blocks": 0}, "EngineConfig.num_kv_blocks must be positive, got 0"),
        ({"max_model_len": 1}, "EngineConfig.max_model_len must be >= 2, got 1"),
    ],
)
def test_engine_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_engine_config_context_length(tiny_model_config):
    assert EngineConfig().context_length(tiny_model_config) == 512
    assert EngineConfig(max_model_len=100).context_length(tiny_model_config) == 100
    assert EngineConfig(max_model_len=4096).context_length(tiny_model_config) == 512


def test_unknown_attention_backend(tiny_lm):
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash9'; available: .*\btorch\b"):
        get_backend("flash9")
    with pytest.raises(ValueError, match="unknown attention backend"):
        DecodeEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=8, attention_backend="flash9"))


def test_bfloat16_end_to_end(make_lm):
    lm = make_lm(0, torch.bfloat16)
    prompts = _prompts(3, seed=15)
    samplings = [GREEDY, SamplingParams(max_tokens=9, temperature=0.8, seed=3, ignore_eos=True), GREEDY]
    results = prefill(lm, prompts, samplings)
    assert all(r.handoff.kv.dtype == torch.bfloat16 for r in results)
    direct = run_decode(DecodeEngine(lm, ROOMY), results)
    t = BytesTransport()
    for r in results:
        r.handoff = t.receive(t.send(r.handoff))
    wired = run_decode(DecodeEngine(lm, ROOMY), results)
    for i, s in enumerate(samplings):
        assert direct[f"r{i}"].tokens == wired[f"r{i}"].tokens
        assert len(direct[f"r{i}"].tokens) == s.max_tokens
    # bf16 rounding may flip a near tie, but most greedy tokens agree with the float32 model.
    f32 = reference_greedy(make_lm(0), prompts[0], GREEDY.max_tokens)
    assert sum(x == y for x, y in zip(direct["r0"].tokens, f32)) >= GREEDY.max_tokens // 2


def test_auto_backend_follows_the_model_device_and_cpu_has_no_graphs(tiny_lm):
    assert type(get_backend("auto", "cpu")).__name__ == type(get_backend("torch")).__name__
    engine = DecodeEngine(tiny_lm, ROOMY)
    engine.capture_graphs()  # on a CPU: nothing to capture, and no error
    assert not engine.runner.cuda_graphs and not engine.runner._graphs
