"""The SUN task families: deterministic splits, scorers on known right and wrong answers, the code sandbox, the
JSONL loader (malformed lines rejected with their line number), and prompt/response encoding."""

from __future__ import annotations

import json

import pytest

from sunray.sun.data import collate, encode_examples, prompt_token_ids
from sunray.sun.sandbox import check_source, run_tests
from sunray.sun.tasks import DataError, Example, get_task, load_jsonl
from sunray.sun.tasks.code import CodeTask, extract_code
from sunray.sun.tasks.math import MathTask, extract_answer
from sunray.sun.tasks.tool import ToolTask, parse_call


@pytest.mark.parametrize("name", ["math", "code", "tool"])
def test_splits_are_deterministic_and_disjoint(name):
    a, b = get_task(name), get_task(name)
    assert a.examples("test", 20) == b.examples("test", 20)  # a fresh instance draws the same examples
    test = {e.prompt for e in a.examples("test")}
    val = {e.prompt for e in a.examples("val")}
    train = {e.prompt for e in a.examples("train")}
    assert len(test) == a.split_sizes["test"] and len(train) == a.split_sizes["train"]
    assert not (test & val) and not (test & train) and not (val & train)


@pytest.mark.parametrize("name", ["math", "code", "tool"])
def test_reference_responses_score_right_and_swapped_ones_wrong(name):
    task = get_task(name)
    ex = task.examples("test", 12)
    assert all(task.score_many(ex, [e.response for e in ex]))
    # Another example's reference is (almost always) wrong for this one.
    swapped = task.score_many(ex, [ex[(i + 1) % len(ex)].response for i in range(len(ex))])
    assert sum(swapped) <= 1


def test_math_scorer():
    task = MathTask()
    ex = Example("q", "3 + 4 = 7. The answer is 7.", answer=7)
    assert task.score(ex, "3 + 4 = 7. The answer is 7.")
    assert task.score(ex, "The answer is 7")
    assert task.score(ex, "so we get 7")  # the last number when there is no "The answer is"
    assert not task.score(ex, "3 + 4 = 8. The answer is 8.")
    assert not task.score(ex, "no idea")
    assert extract_answer("The answer is 1,250.") == 1250
    assert extract_answer("The answer is -3.") == -3
    assert extract_answer("nothing") is None


def test_code_scorer_runs_hidden_tests():
    task = CodeTask()
    ex = Example(
        "Write f(x)", "def f(x):\n    return x * 2", answer={"func": "f", "tests": [[[1], 2], [[5], 10]]}
    )
    assert task.score(ex, "def f(x):\n    return x * 2")
    assert task.score(ex, "```python\ndef f(x):\n    return x + x\n```")
    assert not task.score(ex, "def f(x):\n    return x * 3")
    assert not task.score(ex, "def g(x):\n    return x * 2")  # wrong name
    assert not task.score(ex, "def f(x):\n    return x *")  # syntax error
    assert extract_code("text\n```py\nA\n```\nmore") == "A"


def test_sandbox_refuses_imports_files_and_escapes():
    assert check_source("import os") == "imports are not allowed"
    assert "not allowed" in check_source("from subprocess import run")
    assert "open" in check_source("def f(x):\n    return open('/etc/passwd').read()")
    assert "not allowed" in check_source("def f(x):\n    return ().__class__.__bases__")
    assert "__import__" in check_source("def f(x):\n    return __import__('os')")
    assert "eval" in check_source("def f(x):\n    return eval('1')")
    res = run_tests("import os\ndef f(x):\n    return x", "f", [[[1], 1]])
    assert not res.ok and "imports" in res.error
    # Even past the static check nothing reaches the file system: no open/__import__ among the builtins.
    ok = run_tests("def f(x):\n    return sorted(x)", "f", [[[[3, 1, 2]], [1, 2, 3]]])
    assert ok.ok and ok.passed == 1


def test_sandbox_time_limit():
    res = run_tests("def f(x):\n    while True:\n        x += 1", "f", [[[1], 1]], timeout_s=1.0)
    assert not res.ok and ("timeout" in (res.error or "") or "exited" in (res.error or ""))


def test_tool_scorer():
    task = ToolTask()
    want = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    ex = Example("q", json.dumps(want), answer=want)
    assert task.score(ex, json.dumps(want))
    assert task.score(
        ex, 'Sure: ```json\n{"name": "get_weather", "arguments": {"unit": "celsius", "city": "Paris"}}\n```'
    )
    assert not task.score(
        ex, '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    )  # a requested arg missing
    assert not task.score(
        ex, '{"name": "get_stock_price", "arguments": {"symbol": "Paris"}}'
    )  # wrong function
    assert not task.score(ex, '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}')
    assert not task.score(
        ex, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}'
    )  # enum
    assert not task.score(
        ex, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "x": 1}}'
    )
    assert not task.score(
        ex, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"'
    )  # not JSON
    want2 = {"name": "create_reminder", "arguments": {"text": "stretch", "minutes": 5}}
    ex2 = Example("q", json.dumps(want2), answer=want2)
    assert not task.score(
        ex2, '{"name": "create_reminder", "arguments": {"text": "stretch", "minutes": "5"}}'
    )
    assert parse_call("no json here") is None


def _write(tmp_path, lines: list[str]):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_loader_accepts_both_forms(tmp_path):
    p = _write(
        tmp_path,
        [
            json.dumps({"prompt": "2+2?", "response": "4"}),
            "",
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"},
                    ]
                }
            ),
        ],
    )
    rows = load_jsonl(p)
    assert [r.response for r in rows] == ["4", "hello"]
    assert rows[1].chat() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    task = get_task(str(p))
    assert task.score(rows[0], " 4 \n") and not task.score(rows[0], "5")


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"prompt": "a", "response": "b"', "invalid JSON"),
        ('["prompt", "response"]', "expected a JSON object"),
        ('{"prompt": "a"}', "missing 'response'"),
        ('{"prompt": "a", "response": 3}', '"response" must be a string'),
        ('{"prompt": "  ", "response": "b"}', '"prompt" is empty'),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
            "last message",
        ),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}', "role 'bot'"),
        (
            '{"messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]}',
            "no user message",
        ),
        ('{"messages": "hi"}', "list of at least two"),
    ],
)
def test_jsonl_loader_rejects_malformed_line_with_its_number(tmp_path, bad, reason):
    good = json.dumps({"prompt": "p", "response": "r"})
    p = _write(tmp_path, [good, good, bad, good])
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    assert f"{p}:3:" in str(e.value) and reason in str(e.value)


def test_jsonl_loader_empty_and_missing_files(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(p)
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_encoding_matches_the_engine_and_ends_with_eos(tiny_tokenizer):
    from tiny_models import make_tokenizer

    from sunray.engine.local import encode_prompt

    chat_tok = make_tokenizer(320)
    ex = Example("What is 2 + 3?", "2 + 3 = 5. The answer is 5.")
    assert prompt_token_ids(chat_tok, ex) == encode_prompt(chat_tok, ex.prompt, chat=True)
    eos = chat_tok.eos_token_id
    enc, dropped = encode_examples(
        [ex, Example("x" * 500, "y")], chat_tok, eos, max_prompt_len=100, max_response_len=64
    )
    assert dropped == 1 and enc[0].response_ids[-1] == eos
    assert chat_tok.decode(enc[0].response_ids[:-1]) == ex.response
    # A tokenizer without a chat template gets the plain prompt.
    assert prompt_token_ids(tiny_tokenizer, ex) == tiny_tokenizer.encode(
        ex.prompt + "\n", add_special_tokens=True
    )
    b = collate(enc * 2)
    assert b.prompt_ids.shape[0] == 2 and int(b.response_lens[0]) == len(enc[0].response_ids)
