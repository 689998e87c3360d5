"""The SUN task families: deterministic splits that hold out whole templates, families, tools and answers (issue
15), references that pass their own scorers, scorers on known right and wrong answers, the code sandbox, the JSONL
loader (malformed lines rejected with their line number), and prompt/response encoding."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from sunray.sun.data import collate, encode_examples, prompt_token_ids
from sunray.sun.sandbox import check_source, run_tests
from sunray.sun.tasks import GENERATED, SPLITS, DataError, Example, get_task, leaks, load_jsonl
from sunray.sun.tasks.code import CodeTask, extract_code
from sunray.sun.tasks.math import MathTask, extract_answer
from sunray.sun.tasks.tool import TOOL_SPLITS, TOOLS, ToolTask, parse_call


@pytest.mark.parametrize("name", GENERATED)
def test_splits_are_deterministic_and_disjoint(name):
    a, b = get_task(name), get_task(name)
    for split in SPLITS:  # a fresh instance draws the same examples
        assert a.examples(split) == b.examples(split)
    assert a.fingerprint() == b.fingerprint() and a.fingerprint().startswith(f"{name}-v{a.version}-")
    test = {e.prompt for e in a.examples("test")}
    val = {e.prompt for e in a.examples("val")}
    train = {e.prompt for e in a.examples("train")}
    assert len(test) == a.split_sizes["test"] and len(train) == a.split_sizes["train"]
    assert not (test & val) and not (test & train) and not (val & train)


def test_generation_does_not_depend_on_the_hash_seed():
    """The same examples on every machine: a process with another PYTHONHASHSEED makes the same data."""
    code = "from sunray.sun.tasks import get_task; print([get_task(t).fingerprint() for t in ('math', 'code', 'tool')])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert out == str([get_task(t).fingerprint() for t in GENERATED])


@pytest.mark.parametrize("name", GENERATED)
def test_splits_hold_out_whole_templates(name):
    """No value of a split key (template, family, tool, answer, ...) of a test or val example occurs in train."""
    task = get_task(name)
    assert task.split_keys
    values = {s: [e.keys for e in task.examples(s)] for s in SPLITS}
    for key in task.split_keys:
        per = {s: {k[key] for k in keys} for s, keys in values.items()}
        assert per["test"] and per["val"] and per["train"], key
        assert not per["test"] & per["train"], key
        assert not per["val"] & per["train"], key
        assert not per["test"] & per["val"], key


@pytest.mark.parametrize("name", GENERATED)
def test_no_test_request_normalized_prompt_or_answer_is_in_train(name):
    """What issue 15 measured (sunray.sun.tasks.leaks): prompts equal up to numbers, strings and function names,
    requests, responses and answers of test examples never occur in train."""
    task = get_task(name)
    train, test = task.examples("train"), task.examples("test")
    for fn in (
        leaks.normalize_prompt,
        leaks.request,
        lambda e: leaks.response(name, e),
        lambda e: leaks.answer_key(name, e),
    ):
        seen = {fn(e) for e in train}
        assert not [e.prompt for e in test if fn(e) is not None and fn(e) in seen]


def test_held_out_math_structures_and_code_families_are_made_of_trained_steps():
    """A held-out composition is new, its parts are not: every operation of a test math problem and every step of a
    test code function also occurs in train (so the test split is solvable by composing what was trained)."""
    for name, key, parts in (
        ("math", "structure", lambda v: v.split("-")),
        (
            "code",
            "family",
            lambda v: [
                f"{v.split(':')[0]}:{i}:{p}"
                for i, x in enumerate(v.split(":")[1:])
                for p in re.split(r"[-+]", x)
            ],
        ),
    ):
        task = get_task(name)
        train = {p for e in task.examples("train") for p in parts(e.keys[key])}
        test = {p for e in task.examples("test") for p in parts(e.keys[key])}
        assert test <= train, (name, test - train)


def test_every_held_out_code_wording_is_new_to_train():
    """Code version 3: each val and test description words one step as no train prompt does (PARAPHRASES)."""
    from sunray.sun.tasks.code import PARAPHRASES

    task = CodeTask()
    train = " ".join(e.prompt for e in task.examples("train"))
    for split, col in (("val", 0), ("test", 1)):
        for wording in (PARAPHRASES[k][col] for k in PARAPHRASES):
            stem = wording.split("{")[0].strip()  # the words before the first constant
            assert stem not in train, (split, stem)
        keys = [e.keys["phrasing"] for e in task.examples(split)]
        assert all(k.endswith(f":{split}") for k in keys)
    assert {e.keys["phrasing"] for e in task.examples("train")} == {"train"}


def test_tool_test_prompts_list_only_held_out_tools_whose_kinds_of_arguments_are_trained():
    task = ToolTask()
    for split in SPLITS:
        for e in task.examples(split):
            assert set(e.keys["tools"].split(",")) <= set(TOOL_SPLITS[split])
            for name in e.keys["tools"].split(","):
                assert f'"name":"{name}"' in e.prompt
    assert not set(TOOL_SPLITS["test"]) & set(TOOL_SPLITS["train"])

    def kinds(split):  # parameter types and formats: what argument mapping a tool needs
        return {
            (p["type"], p.get("format")) for t in TOOL_SPLITS[split] for p in TOOLS[t]["parameters"].values()
        }

    assert kinds("test") <= kinds("train")


@pytest.mark.parametrize("name", GENERATED)
def test_every_test_reference_passes_its_scorer(name):
    """Each task can be solved at 1.0 in principle: all test (and val) references pass the task's own scorer."""
    task = get_task(name)
    for split in ("test", "val"):
        ex = task.examples(split)
        ok = task.score_many(ex, [e.response for e in ex])
        assert all(ok), [e.prompt for e, o in zip(ex, ok) if not o][:3]


@pytest.mark.parametrize("name", GENERATED)
def test_reference_responses_score_right_and_swapped_ones_wrong(name):
    task = get_task(name)
    ex = task.examples("test", 12)
    assert all(task.score_many(ex, [e.response for e in ex]))
    # Another example's reference is (almost always) wrong for this one.
    swapped = task.score_many(ex, [ex[(i + 1) % len(ex)].response for i in range(len(ex))])
    assert sum(swapped) <= 1


@pytest.mark.parametrize(
    "name, prompt_chars, response_chars",
    [("math", 260, 90), ("code", 230, 130), ("tool", 1000, 220)],
)
def test_examples_stay_short(name, prompt_chars, response_chars):
    """`make serve` trains the default task models from these tasks on 2 CPU cores at its first start: examples must
    stay about as short as they are (SmolLM2 tokens, train split: math 70 + 31, code 64 + 25, tool 236 + 32)."""
    for e in get_task(name).examples("train"):
        assert len(e.prompt) <= prompt_chars and len(e.response) <= response_chars, e.prompt


@pytest.mark.parametrize("name", GENERATED)
def test_fewshot_prompts_put_solved_train_examples_before_the_unchanged_example(name):
    base, few = get_task(name), get_task(f"{name}-fewshot3")
    assert few.name == f"{name}-fewshot3" and few.fingerprint() != base.fingerprint()
    assert get_task(f"{name}-fewshot3").examples("test") == few.examples(
        "test"
    )  # the same shots on every draw
    solved = {f"Problem: {e.prompt}\nSolution: {e.response}" for e in base.examples("train")}
    for split in SPLITS:
        for b, f in zip(base.examples(split)[:50], few.examples(split)[:50]):
            assert (f.response, f.answer, f.keys) == (
                b.response,
                b.answer,
                b.keys,
            )  # its split keys stay held out
            head, _, last = f.prompt.rpartition("\nProblem: ")
            assert last == b.prompt
            shots = head.removeprefix("Solved examples:\n\n").removesuffix(
                "\n\nNow solve this one the same way."
            )
            shots = shots.split("\n\n")
            assert len(set(shots)) == 3 and all(s in solved for s in shots)  # three distinct train examples
            if split == "train":  # never the example itself
                assert f"Problem: {b.prompt}\nSolution: {b.response}" not in shots
            assert few.score(f, b.response) and not few.score(f, "")


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("math-fewshot0", "shots must be 1 to 8"),
        ("math-fewshot9", "shots must be 1 to 8"),
        ("humaneval-fewshot2", "train split"),
        ("algebra-fewshot2", "unknown task"),
    ],
)
def test_fewshot_specs_that_cannot_work_are_refused(spec, problem):
    with pytest.raises(ValueError, match=problem):
        get_task(spec)


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
    # A requested arg missing.
    assert not task.score(ex, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    # Wrong function.
    assert not task.score(ex, '{"name": "get_stock_price", "arguments": {"symbol": "Paris"}}')
    assert not task.score(ex, '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}')
    # A unit outside the enum.
    assert not task.score(ex, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}')
    assert not task.score(
        ex, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "x": 1}}'
    )
    # Not JSON.
    assert not task.score(ex, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"')
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
