"""SamplingParams validation, the sampler (greedy, top-k, top-p, seeds) and the OutputProcessor (stops, streaming)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import EOS_ID, tok_id

from sunray.engine import sampler
from sunray.engine.output_processor import OutputProcessor
from sunray.engine.sampler import draw, filter_logits, filter_rows, sample, token_generator
from sunray.engine.sequence import MAX_STOP_STRINGS, FinishReason, SamplingParams, Sequence

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 256

# -- SamplingParams --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, r"max_tokens must be an integer >= 1, got 0"),
        ({"max_tokens": -3}, r"max_tokens must be an integer >= 1, got -3"),
        ({"max_tokens": True}, r"max_tokens must be an integer >= 1, got True"),
        ({"max_tokens": 2.0}, r"max_tokens must be an integer >= 1, got 2.0"),
        ({"temperature": -0.1}, r"temperature must be a number in \[0, 2\], got -0.1"),
        ({"temperature": 2.5}, r"temperature must be a number in \[0, 2\], got 2.5"),
        ({"temperature": float("nan")}, r"temperature must be a number in \[0, 2\], got nan"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1.5"),
        ({"top_p": -0.5}, r"top_p must be a number in \(0, 1\], got -0.5"),
        ({"temperature": "hot"}, r"temperature must be a number in \[0, 2\], got 'hot'"),
        ({"seed": True}, r"seed must be a non-negative integer, got True"),
        ({"top_k": True}, r"top_k must be an integer >= 0"),
        ({"top_k": -1}, r"top_k must be an integer >= 0 \(0 turns it off\), got -1"),
        ({"top_k": 2.5}, r"top_k must be an integer >= 0 \(0 turns it off\), got 2.5"),
        ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
        ({"seed": "7"}, r"seed must be a non-negative integer, got '7'"),
        ({"seed": 1.5}, r"seed must be a non-negative integer, got 1.5"),
        ({"seed": 1 << 63}, r"seed must be below 2\^63, got 9223372036854775808"),
        ({"stop": ""}, r"stop must be at most 16 non-empty strings, got \(''\,\)"),
        ({"stop": ["ok", ""]}, r"stop must be at most 16 non-empty strings"),
        ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, r"stop must be at most 16 non-empty strings"),
        ({"stop": [3]}, r"stop must be at most 16 non-empty strings"),
        ({"stop_token_ids": [-1]}, r"stop_token_ids must be non-negative integers, got \(-1,\)"),
        ({"stop_token_ids": ["a"]}, r"stop_token_ids must be non-negative integers"),
    ],
)
def test_sampling_params_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_edges_and_normalizes():
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, seed=0)
    SamplingParams(temperature=2.0, top_p=1e-6, stop=["x"] * MAX_STOP_STRINGS)
    p = SamplingParams(stop="end", stop_token_ids=[5, 6])
    assert p.stop == ("end",) and p.stop_token_ids == (5, 6)
    hash(p)  # frozen and hashable even when built from lists
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1.0, top_k=1).greedy
    assert not SamplingParams(temperature=1.0).greedy


# -- sampler ---------------------------------------------------------------------------------------------------


def _seq(sampling: SamplingParams, num_outputs: int = 0, rid: str = "r") -> Sequence:
    return Sequence(rid, [3, 4, 5], sampling, output_token_ids=[7] * num_outputs)


def _random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 3


def test_greedy_is_argmax():
    logits = _random_logits(6)
    seqs = [_seq(SamplingParams(temperature=0.0), rid=f"r{i}") for i in range(6)]
    assert sample(logits, seqs) == logits.argmax(-1).tolist()


def test_top_k_1_is_greedy_at_any_temperature():
    logits = _random_logits(6, seed=1)
    seqs = [_seq(SamplingParams(temperature=2.0, top_k=1, seed=i), rid=f"r{i}") for i in range(6)]
    assert sample(logits, seqs) == logits.argmax(-1).tolist()


def test_sample_accepts_half_precision_logits():
    logits = _random_logits(3, seed=2).to(torch.bfloat16)
    seqs = [_seq(SamplingParams(temperature=0.0), rid=f"r{i}") for i in range(3)]
    assert sample(logits, seqs) == logits.float().argmax(-1).tolist()


def _kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


# Probabilities (at temperature 1) of the hand-made row below, by token: 3: .50, 0: .30, 4: .15, 1: .04, 2: .01
_PROBS = torch.tensor([0.30, 0.04, 0.01, 0.50, 0.15])
_ROW = _PROBS.log()


@pytest.mark.parametrize(
    ("top_k", "top_p", "expected"),
    [
        (0, 1.0, {0, 1, 2, 3, 4}),
        (1, 1.0, {3}),
        (2, 1.0, {3, 0}),
        (3, 1.0, {3, 0, 4}),
        (5, 1.0, {0, 1, 2, 3, 4}),
        (9, 1.0, {0, 1, 2, 3, 4}),  # k above the vocabulary: no filter
        (0, 0.4, {3}),  # the first token always stays
        (0, 0.6, {3, 0}),  # .50 < .6: the second is needed
        (0, 0.9, {3, 0, 4}),  # .80 < .9 <= .95
        (0, 0.97, {3, 0, 4, 1}),
        (0, 0.999, {0, 1, 2, 3, 4}),
        # top-k first, then top-p over the renormalized survivors: {3, 0} -> .625, .375
        (2, 0.6, {3}),
        (2, 0.7, {3, 0}),
        (3, 0.8, {3, 0}),  # {3, 0, 4} -> .526, .316, .158: .526 < .8 <= .842
        (3, 0.85, {3, 0, 4}),  # .842 < .85: the third is needed too
    ],
)
def test_filter_logits_keeps_expected_set(top_k, top_p, expected):
    out = filter_logits(_ROW, 1.0, top_k, top_p)
    assert _kept(out) == expected
    # The survivors keep their logits; the rest are -inf.
    for t in expected:
        assert out[t] == _ROW[t]
    assert torch.equal(_ROW, _PROBS.log())  # the input is not modified


def test_filter_logits_temperature_sharpens_before_top_p():
    # At temperature 0.5 the probabilities become .50^2 : .30^2 : ... -> token 3 holds about 0.69 of the mass.
    assert _kept(filter_logits(_ROW, 1.0, 0, 0.65)) == {3, 0}
    assert _kept(filter_logits(_ROW, 0.5, 0, 0.65)) == {3}
    assert torch.allclose(filter_logits(_ROW, 0.5, 0, 1.0), _ROW / 0.5)


def test_sampling_only_draws_from_filtered_set():
    logits = _ROW.unsqueeze(0)
    seen = {sample(logits, [_seq(SamplingParams(top_k=2, seed=s))])[0] for s in range(200)}
    assert seen == {3, 0}
    seen = {sample(logits, [_seq(SamplingParams(top_p=0.9, seed=s))])[0] for s in range(300)}
    assert seen == {3, 0, 4}


def test_sampling_follows_the_distribution():
    logits = _ROW.unsqueeze(0)
    n = 3000
    counts = torch.zeros(5)
    for s in range(n):
        counts[sample(logits, [_seq(SamplingParams(seed=s))])[0]] += 1
    # Binomial standard deviation at p=.5, n=3000 is about 0.009: 5 sigma is 0.045.
    assert torch.allclose(counts / n, _PROBS, atol=0.045), counts / n


def _sample_run(seed: int | None, steps: int = 24, batch_logits: torch.Tensor | None = None) -> list[int]:
    """Sample `steps` tokens for one sequence, feeding each back as an output (the logits are fixed per step)."""
    seq = _seq(SamplingParams(temperature=1.0, seed=seed))
    for i in range(steps):
        logits = _random_logits(1, seed=100 + i)
        seq.output_token_ids.append(sample(logits, [seq])[0])
    return seq.output_token_ids


def test_same_seed_same_tokens_different_seed_differs():
    a, b = _sample_run(1234), _sample_run(1234)
    assert a == b
    others = [_sample_run(s) for s in (1235, 7, 99)]
    # Near-flat distributions over 256 tokens: two seeds agreeing on all 24 tokens has probability ~ 0.
    assert all(o != a for o in others)
    # Agreement per position is rare (it would be ~1 for a seed that is ignored).
    agree = sum(x == y for o in others for x, y in zip(o, a))
    assert agree < 24


def test_unseeded_sampling_varies():
    runs = {tuple(_sample_run(None, steps=8)) for _ in range(4)}
    assert len(runs) > 1


def test_seeded_sampling_depends_only_on_seed_and_output_index():
    logits = _random_logits(4, seed=5)
    target = SamplingParams(temperature=1.3, top_p=0.95, seed=42)
    alone = sample(logits[2:3], [_seq(target, num_outputs=3, rid="t")])[0]
    # The same request as row 2 of a batch of others (seeded and not) draws the same token.
    batch = [
        _seq(SamplingParams(temperature=1.0), rid="a"),
        _seq(SamplingParams(temperature=0.7, seed=42), num_outputs=0, rid="b"),
        _seq(target, num_outputs=3, rid="t"),
        _seq(SamplingParams(temperature=1.0, seed=3), num_outputs=3, rid="c"),
    ]
    for _ in range(3):
        assert sample(logits, batch)[2] == alone
    # And it is exactly what the (seed, output index) generator gives.
    # (an inverse transform: the first token whose cumulative probability exceeds that generator's uniform)
    u = torch.rand(1, generator=token_generator(42, 3, torch.device("cpu"))).item()
    cdf = filter_logits(logits[2], 1.3, 0, 0.95).softmax(-1).cumsum(-1)
    assert alone == int((cdf <= u).sum())
    # The output index matters: the generators of neighbouring indexes are different streams.
    draws = [torch.rand(8, generator=token_generator(42, i, torch.device("cpu"))) for i in range(4)]
    assert all(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(draws[1], torch.rand(8, generator=token_generator(42, 1, torch.device("cpu"))))
    assert not torch.equal(draws[1], torch.rand(8, generator=token_generator(43, 1, torch.device("cpu"))))


def _one_row_filter(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The filter written plainly for one row (a whole sort for top-p): what the batched one must give."""
    row = row / temperature
    if 0 < top_k < row.shape[-1]:
        row = row.masked_fill(row < torch.topk(row, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        row = row.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return row


@pytest.mark.parametrize("candidates", [1024, 8], ids=["top-p-candidates-cover", "top-p-falls-back-to-sort"])
def test_batched_filter_matches_the_one_row_filter(candidates, monkeypatch):
    # Peaked rows (scale 6) and flat ones (scale 0.3), each under its own parameters; with 8 candidates the flat
    # rows' top-p mass lies past them, so those rows take the whole-sort path beside the others.
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", candidates)
    g = torch.Generator().manual_seed(11)
    scales = torch.tensor([6.0, 0.3] * 6).unsqueeze(1)
    logits = torch.randn(12, VOCAB, generator=g) * scales
    params = [
        (1.0, 0, 0.9),
        (0.7, 0, 0.9),
        (1.3, 5, 1.0),
        (1.0, 0, 1.0),
        (0.5, 40, 0.8),
        (1.0, 300, 0.95),
    ] * 2
    temps = torch.tensor([t for t, _, _ in params])
    out = filter_rows(logits, temps, [k for _, k, _ in params], [p for _, _, p in params])
    for i, (t, k, p) in enumerate(params):
        assert torch.equal(torch.isfinite(out[i]), torch.isfinite(_one_row_filter(logits[i], t, k, p))), (
            i,
            t,
            k,
            p,
        )
        kept = torch.isfinite(out[i])
        assert torch.allclose(out[i][kept], logits[i][kept] / t)


def test_every_row_of_a_batch_follows_its_distribution():
    # One call, 3000 rows: the batched draw gives each row its own uniform, and the counts follow the row's
    # distribution (5 sigma of a binomial at p=.5, n=3000 is 0.045).
    n = 3000
    logits = _ROW.unsqueeze(0).expand(n, 5)
    for params, probs in (
        (SamplingParams(), _PROBS),
        (SamplingParams(top_k=2), torch.tensor([0.375, 0, 0, 0.625, 0])),
        (SamplingParams(top_p=0.9), torch.tensor([0.30, 0, 0, 0.50, 0.15]) / 0.95),
    ):
        tokens = sample(logits, [_seq(params, rid=f"r{i}") for i in range(n)])
        counts = torch.bincount(torch.tensor(tokens), minlength=5) / n
        assert torch.allclose(counts, probs, atol=0.045), (params, counts)


def test_greedy_and_sampled_rows_share_a_batch():
    logits = _random_logits(6, seed=9)
    seqs = [_seq(SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i), rid=f"r{i}") for i in range(6)]
    tokens = sample(logits, seqs)
    assert tokens[1::2] == logits[1::2].argmax(-1).tolist()
    for i in (0, 2, 4):
        assert tokens[i] == sample(logits[i : i + 1], [seqs[i]])[0]


def test_a_uniform_at_the_top_never_draws_a_dropped_token():
    # u * total can round up to the total: the search then lands past the last kept token (here every token
    # after 3 is dropped); the draw must still be a kept one.
    rows = torch.tensor([[0.0, 1.0, 2.0, 3.0] + [float("-inf")] * 4] * 3)
    for u in (0.0, 0.5, 1.0 - 2**-24, 1.0):
        assert all(0 <= t <= 3 for t in draw(rows, [u] * 3).tolist())
    assert draw(rows, [0.0] * 3).tolist() == [0, 0, 0]


# -- OutputProcessor -------------------------------------------------------------------------------------------


@pytest.fixture
def processor(tiny_tokenizer) -> OutputProcessor:
    return OutputProcessor(tiny_tokenizer, (EOS_ID,), max_model_len=64)


def _ids(*tokens: str) -> list[int]:
    return [tok_id(t) for t in tokens]


def _new_seq(sampling: SamplingParams, prompt: str = "Q:") -> Sequence:
    return Sequence("req", _ids(*prompt), sampling)


def _feed(proc: OutputProcessor, seq: Sequence, tokens: list[int]) -> list[str]:
    """Append tokens one at a time (stopping at finish) and collect the streamed text deltas."""
    deltas = []
    for t in tokens:
        proc.append(seq, t)
        out = proc.take_output(seq)
        deltas.append(out.new_text)
        if seq.finished:
            assert out.finished and out.finish_reason == seq.finish_reason.value
            break
        assert not out.finished and out.finish_reason is None
    return deltas


def test_detokenized_text_matches_full_decode(processor, tiny_tokenizer):
    rng = random.Random(0)
    tokens = [rng.randrange(2, VOCAB) for _ in range(40)]  # includes the special <s>, skipped in the text
    seq = _new_seq(SamplingParams(max_tokens=100))
    deltas = _feed(processor, seq, tokens)
    expected = tiny_tokenizer.decode(tokens, skip_special_tokens=True)
    assert seq.text == expected
    assert "".join(deltas) == expected
    assert not seq.finished


def test_fast_decoder_gives_the_wrappers_text_on_a_byte_level_bpe():
    """The embedded SmolLM2 tokenizer (byte-level BPE: multi-byte characters span tokens, special tokens skipped):
    the Rust backend's decode, which the OutputProcessor uses for speed, gives exactly `tokenizer.decode`'s text,
    and so does the stream of deltas; a tokenizer that cleans up spaces keeps the wrapper's decode."""
    from transformers import AutoTokenizer

    from sunray.engine.output_processor import _decoder
    from sunray.models.files import ensure_default_model

    tok = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    fast = _decoder(tok)
    rng = random.Random(1)
    text = "Grüße, 世界! 🙂 café — naïve x² ≥ 3"
    ids = tok.encode(text, add_special_tokens=False)
    samples = [ids] + [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))] for _ in range(200)]
    for some in samples:
        assert fast(some) == tok.decode(some, skip_special_tokens=True)
    proc = OutputProcessor(tok, (), max_model_len=256)
    seq = Sequence("r", tok.encode("Say:", add_special_tokens=False), SamplingParams(max_tokens=200))
    deltas = _feed(proc, seq, ids)
    assert "".join(deltas) == seq.text == tok.decode(ids, skip_special_tokens=True) == text
    tok.clean_up_tokenization_spaces = True
    calls = []
    tok.decode = lambda ids, **kw: calls.append(ids) or ""
    _decoder(tok)([1, 2])
    assert calls == [[1, 2]]


@pytest.mark.parametrize("which", ["eos", "stop_token"])
def test_eos_and_stop_token_finish_with_stop_and_add_no_text(processor, which):
    stop_tok = tok_id("!")
    sp = SamplingParams(max_tokens=10, stop_token_ids=(stop_tok,))
    seq = _new_seq(sp)
    end = EOS_ID if which == "eos" else stop_tok
    deltas = _feed(processor, seq, _ids("H", "i") + [end, tok_id("x")])
    assert seq.finish_reason is FinishReason.STOP
    assert seq.text == "Hi"
    assert deltas == ["H", "i", ""]
    assert seq.output_token_ids[-1] == end  # the token is recorded, its text is not
    assert len(seq.output_token_ids) == 3


def test_max_tokens_finishes_with_length(processor):
    seq = _new_seq(SamplingParams(max_tokens=3))
    deltas = _feed(processor, seq, _ids("a", "b", "c", "d"))
    assert seq.finish_reason is FinishReason.LENGTH
    assert seq.text == "abc" and "".join(deltas) == "abc"
    assert len(seq.output_token_ids) == 3


def test_context_length_finishes_with_length(tiny_tokenizer):
    proc = OutputProcessor(tiny_tokenizer, (EOS_ID,), max_model_len=6)
    seq = _new_seq(SamplingParams(max_tokens=50), prompt="abcd")
    _feed(proc, seq, _ids("x", "y", "z"))
    assert seq.finish_reason is FinishReason.LENGTH
    assert seq.num_tokens == 6 and seq.text == "xy"


def test_ignore_eos_keeps_going(processor):
    seq = _new_seq(SamplingParams(max_tokens=4, ignore_eos=True))
    deltas = _feed(processor, seq, [tok_id("a"), EOS_ID, tok_id("b"), EOS_ID])
    assert seq.finish_reason is FinishReason.LENGTH
    assert seq.text == "ab" and "".join(deltas) == "ab"
    assert seq.output_token_ids == [tok_id("a"), EOS_ID, tok_id("b"), EOS_ID]
    # stop_token_ids still apply under ignore_eos.
    seq = _new_seq(SamplingParams(max_tokens=4, ignore_eos=True, stop_token_ids=(tok_id("b"),)))
    _feed(processor, seq, [tok_id("a"), EOS_ID, tok_id("b"), tok_id("c")])
    assert seq.finish_reason is FinishReason.STOP and seq.text == "a"


def test_stop_string_split_over_two_tokens(processor):
    # "face" arrives as "fa" + "ce"; the stop string "ace" straddles the two tokens.
    seq = _new_seq(SamplingParams(max_tokens=20, stop=("ace",)))
    deltas = _feed(processor, seq, _ids("H", "i", " ", "fa", "ce", "!", "!"))
    assert seq.finish_reason is FinishReason.STOP
    assert seq.text == "Hi f"
    assert "".join(deltas) == "Hi f"
    assert len(seq.output_token_ids) == 5  # nothing after the stop string
    # Never half-emitted: no prefix of the stop string longer than what ends up in the text leaks out.
    streamed = ""
    for d in deltas:
        streamed += d
        assert "ace" not in streamed and "fa" not in streamed and "Hi f".startswith(streamed)


def test_stop_string_false_start_then_match(processor):
    seq = _new_seq(SamplingParams(max_tokens=20, stop=("abc",)))
    deltas = _feed(processor, seq, _ids("ab", "ab", "c", "d"))
    assert seq.finish_reason is FinishReason.STOP
    assert seq.text == "ab" and "".join(deltas) == "ab"
    assert deltas == ["", "ab", ""]  # the trailing "ab" was held back, then cut


def test_stop_string_over_many_tokens_and_several_stops(processor):
    seq = _new_seq(SamplingParams(max_tokens=30, stop=("zzz", "STOP")))
    deltas = _feed(processor, seq, _ids("o", "k", " ", "S", "T", "O", "P", "x"))
    assert seq.finish_reason is FinishReason.STOP
    assert seq.text == "ok " and "".join(deltas) == "ok "
    assert all("S" not in d for d in deltas)


def test_stop_string_in_one_token(processor):
    seq = _new_seq(SamplingParams(max_tokens=30, stop=("c",)))
    deltas = _feed(processor, seq, _ids("a", "bc", "d"))
    assert seq.text == "ab" and "".join(deltas) == "ab"
    assert seq.finish_reason is FinishReason.STOP


def test_held_back_text_is_released_when_no_stop_comes(processor):
    seq = _new_seq(SamplingParams(max_tokens=4, stop=("acex",)))
    deltas = _feed(processor, seq, _ids("x", "ac", "e", "y"))
    # While running, the last len(stop) - 1 = 3 characters stay back; finishing by length releases them.
    assert deltas[:3] == ["", "", "x"]
    assert seq.finish_reason is FinishReason.LENGTH
    assert "".join(deltas) == "xacey" == seq.text


def test_random_streams_with_stop_strings(processor, tiny_tokenizer):
    """Property over random token streams: streamed deltas always concatenate to the final text, the final text
    never contains a stop string, and it is the full decode cut at the first stop string."""
    rng = random.Random(1)
    alphabet = _ids("a", "b", "c", "ab", "bc", "ca", " ")
    for _ in range(200):
        stops = tuple(rng.choice(["abc", "ca", "cab", "b b", "aa"]) for _ in range(rng.randint(1, 2)))
        tokens = [rng.choice(alphabet) for _ in range(rng.randint(1, 12))]
        seq = _new_seq(SamplingParams(max_tokens=len(tokens), stop=stops))
        deltas = _feed(processor, seq, tokens)
        assert "".join(deltas) == seq.text
        assert all(s not in seq.text for s in stops)
        full = tiny_tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        assert full.startswith(seq.text)
        if seq.finish_reason is FinishReason.STOP:
            # The text ends exactly where a stop string begins.
            assert any(full[len(seq.text) :].startswith(s) for s in stops)
        else:
            assert seq.text == full


def test_take_output_reports_new_tokens_once(processor):
    seq = _new_seq(SamplingParams(max_tokens=5), prompt="hey")
    processor.append(seq, tok_id("a"))
    processor.append(seq, tok_id("b"))
    out = processor.take_output(seq)
    assert out.new_token_ids == _ids("a", "b") and out.new_text == "ab"
    assert out.num_prompt_tokens == 3 and out.num_output_tokens == 2
    out = processor.take_output(seq)
    assert out.new_token_ids == [] and out.new_text == ""
