"""Workload generation: seeded distributions within statistical tolerance, lengths, datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadgen.workload import (
    LengthDist,
    WorkloadConfig,
    generate,
    interarrival_times,
    load_dataset,
    synthetic_prompt,
    zipf_weights,
)


def test_zipf_weights_closed_form():
    np.testing.assert_allclose(zipf_weights(4, 0.0), [0.25] * 4)
    w = zipf_weights(3, 1.0)
    np.testing.assert_allclose(w, np.array([1, 1 / 2, 1 / 3]) / (1 + 1 / 2 + 1 / 3))
    with pytest.raises(ValueError, match="alpha"):
        zipf_weights(3, -1)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.5])
def test_zipf_frequencies(alpha):
    models = tuple(f"m{i}" for i in range(8))
    specs = generate(WorkloadConfig(models, alpha=alpha, seed=3), 40_000, rate=100.0)
    counts = np.array([sum(s.model == m for s in specs) for m in models]) / len(specs)
    # binomial standard error at n = 40k is at most 0.0025: 4 sigma
    np.testing.assert_allclose(counts, zipf_weights(8, alpha), atol=0.01)


def test_poisson_rate_and_cv():
    gaps = interarrival_times(np.random.default_rng(1), 40_000, 25.0, "poisson")
    assert gaps.mean() == pytest.approx(1 / 25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_cv(cv):
    gaps = interarrival_times(np.random.default_rng(2), 80_000, 10.0, "gamma", cv)
    assert gaps.mean() == pytest.approx(0.1, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_generate_rate_duration_and_determinism():
    cfg = WorkloadConfig(
        ("a", "b"), alpha=1.0, input_len=LengthDist(10, 20), output_len=LengthDist(5, 5), seed=7
    )
    specs = generate(cfg, 100_000, rate=50.0, duration_s=200.0)
    assert specs[0].arrival_s == 0.0
    assert all(s.arrival_s < 200.0 for s in specs)
    assert len(specs) == pytest.approx(50 * 200, rel=0.04)  # Poisson count: sd 1%
    assert all(10 <= s.prompt_len <= 20 and s.output_len == 5 for s in specs)
    again = generate(cfg, 100_000, rate=50.0, duration_s=200.0)
    assert again == specs
    # the same seed at another rate: the same models and lengths, times scaled
    fast = generate(cfg, 1000, rate=100.0)
    slow = generate(cfg, 1000, rate=50.0)
    assert [(s.model, s.prompt_len) for s in fast] == [(s.model, s.prompt_len) for s in slow]
    assert slow[-1].arrival_s == pytest.approx(2 * fast[-1].arrival_s)
    closed = generate(cfg, 10)
    assert len(closed) == 10 and all(s.arrival_s == 0 for s in closed)


def test_length_parse_errors():
    assert LengthDist.parse("128") == LengthDist(128, 128)
    assert LengthDist.parse("1:9").mean == 5
    for bad in ("0", "9:1", "a", "1:2:3"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_workload_config_errors():
    with pytest.raises(ValueError, match="distinct"):
        WorkloadConfig(("a", "a"))
    with pytest.raises(ValueError, match="arrival"):
        WorkloadConfig(("a",), arrival="weibull")
    with pytest.raises(ValueError, match="rate"):
        generate(WorkloadConfig(("a",)), 10, rate=0.0)


def test_synthetic_prompt_words():
    p = synthetic_prompt(3, 50)
    assert len(p.split()) == 50
    assert p == synthetic_prompt(3, 50) and p != synthetic_prompt(4, 50)


def test_dataset_formats(tmp_path):
    lines = [
        {"conversations": [{"from": "human", "value": "x" * 40}, {"from": "gpt", "value": "y" * 400}]},
        {"prompt": "p" * 80, "response": "r" * 8},
        {"messages": [{"role": "user", "content": "u" * 20}, {"role": "assistant", "content": "a" * 12}]},
        {"conversations": [{"from": "gpt", "value": "orphan"}]},  # no human turn: skipped
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    pairs = load_dataset(path)
    assert [(n_in, n_out) for _, n_in, n_out in pairs] == [(10, 100), (20, 2), (5, 3)]
    assert len(load_dataset(path, max_prompt_tokens=10)) == 2
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(lines))
    assert len(load_dataset(arr)) == 3
    cfg = WorkloadConfig(("m",), dataset=tuple(pairs), seed=1)
    specs = generate(cfg, 30, rate=10.0)
    assert all(
        s.prompt is not None and (s.prompt_len, s.output_len) in {(10, 100), (20, 2), (5, 3)} for s in specs
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_dataset(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="no usable"):
        load_dataset(empty)
