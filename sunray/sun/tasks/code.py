"""Short Python functions made by composing small steps, scored by running hidden unit tests in the sandbox
(`sunray.sun.sandbox`).

Three kinds of function, each a pipeline of steps with random constants:
- list: keep the numbers of `xs` that pass a filter, map each, reduce (`sum([v * 3 for v in xs if v > 5])`);
- string: one or two transformations of `s`, then a finishing step (`s[::-1].replace('a', '')[2:].count('e')`);
- number: two or three arithmetic steps on `x`, one line each.
The prompt describes the steps in words ("... takes the numbers in xs that are greater than 5, multiplies each by
3, and returns their sum."); the reference response is the code alone (no markdown fences). A completion passes
when every hidden test passes.

Split keys (`Example.keys`), none of which a test example shares with train:
- `family`: the kind and its steps without the constants (e.g. `list:gt:mul:sum`); whole families are held out,
  so a test function combines steps in a way never trained on (every single step is trained on, in other
  families);
- `template`: the phrasing of the request around the description (test and val have their own).
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sunray.sun.sandbox import run_tests
from sunray.sun.tasks.base import Example, GeneratedTask, partition, pick

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)
WORDS = (
    "apple",
    "banana",
    "river",
    "mountain",
    "python",
    "sunray",
    "garden",
    "window",
    "planet",
    "orange",
    "silver",
)
FUNCTION_NAMES = ("solve", "f", "compute", "transform", "process", "calc", "answer", "helper", "run", "task")
TEMPLATES = {
    "train": (
        "Write a Python function {f}({sig}) that {desc}.",
        "Define {f}({sig}) in Python: it {desc}.",
        "Implement a Python function {f}({sig}) which {desc}.",
    ),
    "val": ("Create the Python function {f}({sig}); it {desc}.",),
    "test": (
        "Python task: write {f}({sig}), which {desc}.",
        "Give the code of a Python function {f}({sig}) that {desc}.",
    ),
}


def extract_code(completion: str) -> str:
    """The code of a completion: the first fenced block if there is one, else the whole text."""
    m = _FENCE.search(completion)
    return (m.group(1) if m else completion).strip("\n")


# -- list pipelines: filter, map, reduce --------------------------------------------------------------------
# Each step: (description, code, python function), made from constants drawn by the caller.
def _filters(k: int, q: int) -> dict[str, tuple[str, str, Callable[[int], bool]]]:
    return {
        "all": ("every number in xs", "", lambda v: True),
        "gt": (f"the numbers in xs that are greater than {k}", f" if v > {k}", lambda v: v > k),
        "lt": (f"the numbers in xs that are smaller than {k}", f" if v < {k}", lambda v: v < k),
        "even": ("the even numbers in xs", " if v % 2 == 0", lambda v: v % 2 == 0),
        "odd": ("the odd numbers in xs", " if v % 2 == 1", lambda v: v % 2 == 1),
        "div": (f"the numbers in xs divisible by {q}", f" if v % {q} == 0", lambda v: v % q == 0),
        "ne": (f"the numbers in xs other than {k}", f" if v != {k}", lambda v: v != k),
    }


def _maps(a: int, b: int) -> dict[str, tuple[str, str, Callable[[int], int]]]:
    return {
        "id": ("", "v", lambda v: v),
        "mul": (f"multiplies each by {a}", f"v * {a}", lambda v: v * a),
        "add": (f"adds {b} to each", f"v + {b}", lambda v: v + b),
        "sq": ("squares each", "v * v", lambda v: v * v),
    }


REDUCERS: dict[str, tuple[str, str, Callable[[list[int]], Any]]] = {
    "list": ("returns them as a list", "{}", lambda ys: ys),
    "sum": ("returns their sum", "sum({})", sum),
    "count": ("returns how many there are", "len({})", len),
    "max": (
        "returns the largest of them, or 0 if there are none",
        "max({}, default=0)",
        lambda ys: max(ys, default=0),
    ),
    "min": (
        "returns the smallest of them, or 0 if there are none",
        "min({}, default=0)",
        lambda ys: min(ys, default=0),
    ),
    "sorted": (
        "returns them sorted from largest to smallest",
        "sorted({}, reverse=True)",
        lambda ys: sorted(ys, reverse=True),
    ),
}
LIST_FAMILIES = tuple(
    f"list:{f}:{m}:{r}"
    for f in _filters(0, 2)
    for m in _maps(0, 0)
    for r in REDUCERS
    if not (r == "count" and m != "id")  # counting ignores the map
)


def _list_function(rng: random.Random, family: str) -> tuple[str, str, str, Callable[..., Any], Callable]:
    _, fk, mk, rk = family.split(":")
    k = pick(rng, [v for v in range(-10, 21) if v])  # never 0: `v > 0` is the code of no other filter
    q, a, b = rng.randint(3, 7), rng.randint(2, 9), rng.randint(1, 30)
    fdesc, fcode, fref = _filters(k, q)[fk]
    mdesc, mcode, mref = _maps(a, b)[mk]
    rdesc, rcode, rref = REDUCERS[rk]
    desc = f"takes {fdesc}, {mdesc}, and {rdesc}" if mdesc else f"takes {fdesc} and {rdesc}"
    body = "return " + rcode.format(f"[{mcode} for v in xs{fcode}]")

    def inputs(r: random.Random) -> list[Any]:
        return [[r.choice([r.randint(-6, 6) * q, r.randint(-20, 40), k]) for _ in range(r.randint(0, 8))]]

    return "xs", desc, body, lambda xs: rref([mref(v) for v in xs if fref(v)]), inputs


# -- string pipelines: one or two transformations, then a finishing step ------------------------------------
def _transforms(c: str, d: str, n: int) -> dict[str, tuple[str, str, Callable[[str], str]]]:
    return {
        "rev": ("reverses it", "[::-1]", lambda s: s[::-1]),
        "rep": (f"replaces every '{c}' with '{d}'", f".replace('{c}', '{d}')", lambda s: s.replace(c, d)),
        "rm": (f"removes every '{c}'", f".replace('{c}', '')", lambda s: s.replace(c, "")),
        "head": (f"keeps its first {n} characters", f"[:{n}]", lambda s: s[:n]),
        "tail": (f"drops its first {n} characters", f"[{n}:]", lambda s: s[n:]),
    }


def _finishers(e: str, sep: str, m: int, suffix: str) -> dict[str, tuple[str, str, Callable[[str], Any]]]:
    return {
        "ret": ("returns the result", "{}", lambda s: s),
        "len": ("returns its length", "len({})", len),
        "count": (f"returns how many times '{e}' occurs in it", f"{{}}.count('{e}')", lambda s: s.count(e)),
        "suffix": (f"returns it followed by '{suffix}'", f"{{}} + '{suffix}'", lambda s: s + suffix),
        "join": (
            f"returns {m} copies of it joined by '{sep}'",
            f"'{sep}'.join([{{}}] * {m})",
            lambda s: sep.join([s] * m),
        ),
    }


STRING_FAMILIES = tuple(
    f"str:{'+'.join(ts)}:{g}"
    for k in (1, 2)
    for ts in itertools.product(_transforms("a", "b", 1), repeat=k)
    if len(set(ts)) == len(ts)
    for g in _finishers("a", "-", 2, "x")
)


def _string_function(rng: random.Random, family: str) -> tuple[str, str, str, Callable[..., Any], Callable]:
    _, tks, gk = family.split(":")
    c, d, e = rng.sample("aeinorst", 3)
    n, m = rng.randint(1, 4), rng.randint(2, 4)
    sep, suffix = pick(rng, ("-", "+", ", ", " ", "*", "/")), "".join(rng.sample(string.ascii_lowercase, 2))
    transforms = _transforms(c, d, n)
    steps = [transforms[t] for t in tks.split("+")]
    gdesc, gcode, gref = _finishers(e, sep, m, suffix)[gk]
    desc = "takes the string s, " + ", ".join(t[0] for t in steps) + f", and {gdesc}"
    body = "return " + gcode.format("s" + "".join(t[1] for t in steps))

    def ref(s: str) -> Any:
        for t in steps:
            s = t[2](s)
        return gref(s)

    def inputs(r: random.Random) -> list[Any]:
        w = (
            pick(r, WORDS)
            if r.random() < 0.5
            else "".join(r.choice("aeinorstlmpu") for _ in range(r.randint(3, 9)))
        )
        return [w]

    return "s", desc, body, ref, inputs


# -- number pipelines: two or three arithmetic steps ----------------------------------------------------------
def _arith(a: int, b: int, m: int) -> dict[str, tuple[str, str, Callable[[int], int]]]:
    return {
        "mul": (f"multiplies it by {a}", f"x * {a}", lambda x: x * a),
        "add": (f"adds {b}", f"x + {b}", lambda x: x + b),
        "sub": (f"subtracts {b}", f"x - {b}", lambda x: x - b),
        "sq": ("squares it", "x * x", lambda x: x * x),
        "mod": (f"takes the remainder after dividing by {m}", f"x % {m}", lambda x: x % m),
        "fdiv": (f"divides it by {m}, rounding down", f"x // {m}", lambda x: x // m),
    }


NUMBER_FAMILIES = tuple(
    f"num:{'-'.join(ops)}"
    for k in (2, 3)
    for ops in itertools.product(_arith(2, 1, 3), repeat=k)
    if all(p != q for p, q in itertools.pairwise(ops))
)


def _number_function(rng: random.Random, family: str) -> tuple[str, str, str, Callable[..., Any], Callable]:
    ops = family.split(":")[1].split("-")
    steps = []
    for op in ops:  # fresh constants for every step
        a, b, m = rng.randint(2, 9), rng.randint(1, 30), rng.randint(2, 9)
        steps.append(_arith(a, b, m)[op])
    desc = (
        "takes the integer x, "
        + ", ".join(s[0] for s in steps[:-1])
        + f", then {steps[-1][0]}, and returns it"
    )
    body = "\n    ".join(f"x = {s[1]}" for s in steps) + "\n    return x"

    def ref(x: int) -> int:
        for s in steps:
            x = s[2](x)
        return x

    return "x", desc, body, ref, lambda r: [r.randint(-20, 60)]


FAMILIES = LIST_FAMILIES + STRING_FAMILIES + NUMBER_FAMILIES
KINDS = {
    "list": (LIST_FAMILIES, _list_function),
    "str": (STRING_FAMILIES, _string_function),
    "num": (NUMBER_FAMILIES, _number_function),
}


def _split_families() -> dict[str, dict[str, list[str]]]:
    """split -> kind -> families; held out per kind, so that test and val have functions of every kind."""
    out: dict[str, dict[str, list[str]]] = {s: {} for s in ("train", "val", "test")}
    for kind, (group, _) in KINDS.items():
        for s, families in partition(group, f"code-family-{kind}", test=0.2, val=0.1).items():
            out[s][kind] = families
    return out


SPLIT_FAMILIES = _split_families()


class CodeTask(GeneratedTask):
    name = "code"
    max_new_tokens = 96
    num_tests = 6
    split_keys = ("family", "template")

    def generate(self, rng: random.Random, split: str) -> Example:
        kind = pick(rng, sorted(KINDS))
        family = pick(rng, SPLIT_FAMILIES[split][kind])
        sig, desc, body, ref, gen = KINDS[kind][1](rng, family)
        func = pick(rng, FUNCTION_NAMES)
        t = rng.randrange(len(TEMPLATES[split]))
        prompt = TEMPLATES[split][t].format(f=func, sig=sig, desc=desc)
        for _ in range(20):  # hidden tests that tell functions apart: not all with the same expected value
            tests = []
            for _ in range(self.num_tests):
                args = gen(rng)
                tests.append([args, ref(*args)])
            if len({repr(want) for _, want in tests}) > 1:
                break
        return Example(
            prompt=prompt,
            response=f"def {func}({sig}):\n    {body}",
            answer={"func": func, "tests": tests},
            keys={"family": family, "template": f"{split}{t}"},
        )

    def score(self, example: Example, completion: str) -> bool:
        return run_tests(extract_code(completion), example.answer["func"], example.answer["tests"]).ok

    def score_many(self, examples: list[Example], completions: list[str]) -> list[bool]:
        with ThreadPoolExecutor(max_workers=4) as pool:  # each check is its own process
            return list(pool.map(self.score, examples, completions))
