"""How much of a generated task's test split is already in its train split.

    python -m sunray.sun.tasks.leaks [--tasks math code tool] [--json out.json]

For every test example it asks whether train holds the same

- `prompt`: the exact prompt string;
- `normalized prompt`: the prompt with numbers, quoted strings and function names (`name(`) blanked;
- `request`: the prompt's last line (for tool, the request; math and code prompts are one line);
- `response`: the exact reference response (for code, with the function name blanked);
- `structure`: what the reference does, with the constants blanked: math, the sequence of operators in the
  worked arithmetic (`+ - *`); code, the reference code with numbers, non-empty strings and the function name
  blanked;
  tool, the function called;
- `answer`: math, the final number; tool, the whole reference call;
- and each split key the examples carry (`Example.keys`: template, family, tool, ...);

and scores a copying baseline: the reference response of the train example whose request (the prompt's
last line, function names blanked) is most similar (word-set Jaccard; for code with the test's function name put in), scored by the task's own scorer. A task whose
test split can be solved by copying cannot tell a model that generalizes from one that memorized.

The measures use nothing but the examples, so the same script measures any version of the tasks.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from sunray.sun.tasks import get_task
from sunray.sun.tasks.base import Example

_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_CALLED = re.compile(r"\b[A-Za-z_]\w*(?=\()")
_OPS = re.compile(r"(?<=\d)\s*([-+*/])\s*(?=\d)")
_DEF = re.compile(r"\bdef\s+\w+\(")


def normalize(text: str) -> str:
    text = _QUOTED.sub("Q", text)
    text = _CALLED.sub("F", text)
    return " ".join(_NUM.sub("#", text).lower().split())


def normalize_prompt(ex: Example) -> str:
    return normalize(ex.prompt)


def structure(task: str, ex: Example) -> str:
    if task == "math":
        return " ".join(_OPS.findall(ex.response))
    if task == "code":  # numbers and non-empty strings blanked; the functions it calls kept
        return _NUM.sub("#", re.sub(r"'[^']+'", "Q", _DEF.sub("def F(", ex.response)))
    if task == "tool":
        return str((ex.answer or {}).get("name"))
    return normalize(ex.response)


def answer_key(task: str, ex: Example) -> str | None:
    if task == "math":
        return str(ex.answer)
    if task == "tool":
        return json.dumps(ex.answer, sort_keys=True)
    return None


def response(task: str, ex: Example) -> str:
    return _DEF.sub("def F(", ex.response) if task == "code" else ex.response


def request(ex: Example) -> str:
    return ex.prompt.strip().splitlines()[-1]


def _keys(ex: Example) -> dict[str, str]:
    return dict(getattr(ex, "keys", None) or {})


def measure(name: str) -> dict[str, Any]:
    task = get_task(name)
    train, test = task.examples("train"), task.examples("test")
    measures: dict[str, Any] = {
        "prompt": (lambda e: e.prompt),
        "normalized prompt": normalize_prompt,
        "request": (lambda e: request(e)),
        "response": (lambda e: response(name, e)),
        "structure": (lambda e: structure(name, e)),
    }
    if answer_key(name, test[0]) is not None:
        measures["answer"] = lambda e: answer_key(name, e)
    for k in _keys(test[0]):
        measures[f"key {k}"] = lambda e, k=k: _keys(e).get(k)
    out: dict[str, Any] = {"task": name, "version": getattr(task, "version", None), "n_test": len(test)}
    shares = {}
    for label, fn in measures.items():
        seen = {fn(e) for e in train}
        shares[label] = round(sum(fn(e) in seen for e in test) / len(test), 3)
    out["test share also in train"] = shares
    out["copying baseline accuracy"] = round(_copying_baseline(name, task, train, test), 3)
    return out


def _copying_baseline(name: str, task, train: list[Example], test: list[Example]) -> float:
    def words(e: Example) -> set[str]:
        return set(_CALLED.sub("F", request(e)).lower().split())

    train_words = [words(e) for e in train]
    guesses = []
    for ex in test:
        w = words(ex)
        best = max(range(len(train)), key=lambda i: len(w & train_words[i]) / len(w | train_words[i]))
        guess = train[best].response
        if name == "code" and isinstance(ex.answer, dict):
            guess = _DEF.sub(f"def {ex.answer['func']}(", guess)
        guesses.append(guess)
    return sum(task.score_many(test, guesses)) / len(test)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["math", "code", "tool"])
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    results = [measure(t) for t in args.tasks]
    labels = list(dict.fromkeys(k for r in results for k in r["test share also in train"]))
    print("| task | version | " + " | ".join(labels) + " | copying baseline |")
    print("|---|---|" + "---:|" * (len(labels) + 1))
    for r in results:
        cells = [
            f"{r['test share also in train'][k]:.3f}" if k in r["test share also in train"] else "-"
            for k in labels
        ]
        print(
            f"| {r['task']} | {r['version']} | "
            + " | ".join(cells)
            + f" | {r['copying baseline accuracy']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
