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
- `template`: the phrasing of the request around the description (test and val have their own);
- `phrasing` (version 3): one step of every val and test description is worded as train never words it
  (`PARAPHRASES`: "the elements of xs exceeding 5" for train's "the numbers in xs that are greater than 5"), so
  the task asks what a user asks, in words of their own, and not only new compositions of trained phrases: in
  version 2 full fine-tuning of the 135M base passed 0.998 of the test functions, which could not tell methods
  apart (docs/results/accuracy.md).
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

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
# Held-out wordings of each step, (val, test); train words each step as the builders below do. Formatted with the
# step's constants. A map that leaves the numbers as they are ("id") has no words, so no paraphrase.
PARAPHRASES: dict[str, tuple[str, str]] = {
    "filter:all": ("all of xs", "each value of xs"),
    "filter:gt": ("the values of xs above {k}", "the elements of xs exceeding {k}"),
    "filter:lt": ("the values of xs below {k}", "the elements of xs under {k}"),
    "filter:even": ("the values of xs that are multiples of 2", "the elements of xs that 2 divides evenly"),
    "filter:odd": (
        "the values of xs that are not multiples of 2",
        "the elements of xs that 2 does not divide",
    ),
    "filter:div": (
        "the values of xs that are multiples of {q}",
        "the elements of xs that {q} divides evenly",
    ),
    "filter:ne": ("the values of xs except those equal to {k}", "the elements of xs that differ from {k}"),
    "map:mul": ("scales each by {a}", "replaces each with {a} times itself"),
    "map:add": ("increases each by {b}", "raises every one of them by {b}"),
    "map:sq": ("raises each to the power of 2", "replaces each with its square"),
    "reduce:list": ("returns the resulting list", "gives back those values in a list"),
    "reduce:sum": ("returns the total", "gives back the sum of those values"),
    "reduce:count": ("returns the number of them", "gives back how many values that is"),
    "reduce:max": (
        "returns the biggest one, or 0 if there is none",
        "gives back their maximum (0 when empty)",
    ),
    "reduce:min": ("returns the least one, or 0 if there is none", "gives back their minimum (0 when empty)"),
    "reduce:sorted": ("returns them in descending order", "gives back those values ordered from high to low"),
    "transform:rev": ("turns it backwards", "writes it in reverse order"),
    "transform:rep": ("swaps each '{c}' for '{d}'", "changes all occurrences of '{c}' into '{d}'"),
    "transform:rm": ("deletes each '{c}'", "strips out all occurrences of '{c}'"),
    "transform:head": ("cuts it to the first {n} characters", "truncates it to a length of {n}"),
    "transform:tail": ("removes the first {n} characters", "skips its leading {n} characters"),
    "finish:ret": ("returns what is left", "gives back the resulting string"),
    "finish:len": ("returns the number of characters", "gives back how long it is"),
    "finish:count": ("returns the number of '{e}' characters in it", "gives back how often '{e}' appears"),
    "finish:suffix": (
        "returns it with '{suffix}' appended",
        "gives back the string with '{suffix}' added at the end",
    ),
    "finish:join": (
        "returns it repeated {m} times with '{sep}' between the copies",
        "gives back {m} copies separated by '{sep}'",
    ),
    "arith:mul": ("scales it by {a}", "replaces it with {a} times itself"),
    "arith:add": ("increases it by {b}", "raises it by {b}"),
    "arith:sub": ("decreases it by {b}", "lowers it by {b}"),
    "arith:sq": ("raises it to the power of 2", "replaces it with its square"),
    "arith:mod": ("reduces it modulo {m}", "keeps its remainder modulo {m}"),
    "arith:fdiv": ("floor-divides it by {m}", "replaces it with the integer quotient of itself and {m}"),
}


class Step(NamedTuple):
    """One step of a function's description: its PARAPHRASES key, its train wording, and its constants."""

    key: str
    words: str
    consts: dict[str, Any]

    def worded(self, split: str) -> str:
        if split == "train" or self.key not in PARAPHRASES:
            return self.words
        return PARAPHRASES[self.key][0 if split == "val" else 1].format(**self.consts)


def reword(rng: random.Random, steps: list[Step], split: str) -> tuple[list[str], str]:
    """The steps' words for `split`, and the `phrasing` key: in val and test one step (at random among those with
    words) takes its held-out wording; train keeps its own ("train")."""
    words = [st.words for st in steps]
    if split == "train":
        return words, "train"
    i = pick(rng, [j for j, st in enumerate(steps) if st.key in PARAPHRASES])
    words[i] = steps[i].worded(split)
    return words, f"{steps[i].key}:{split}"


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


def _list_function(
    rng: random.Random, family: str, split: str
) -> tuple[str, str, str, Callable[..., Any], Callable, str]:
    _, fk, mk, rk = family.split(":")
    k = pick(rng, [v for v in range(-10, 21) if v])  # never 0: `v > 0` is the code of no other filter
    q, a, b = rng.randint(3, 7), rng.randint(2, 9), rng.randint(1, 30)
    fdesc, fcode, fref = _filters(k, q)[fk]
    mdesc, mcode, mref = _maps(a, b)[mk]
    rdesc, rcode, rref = REDUCERS[rk]
    consts = {"k": k, "q": q, "a": a, "b": b}
    steps = [Step(f"filter:{fk}", fdesc, consts), Step(f"reduce:{rk}", rdesc, consts)]
    if mdesc:
        steps.insert(1, Step(f"map:{mk}", mdesc, consts))
    words, phrasing = reword(rng, steps, split)
    desc = f"takes {words[0]}, {words[1]}, and {words[2]}" if mdesc else f"takes {words[0]} and {words[1]}"
    body = "return " + rcode.format(f"[{mcode} for v in xs{fcode}]")

    def inputs(r: random.Random) -> list[Any]:
        return [[r.choice([r.randint(-6, 6) * q, r.randint(-20, 40), k]) for _ in range(r.randint(0, 8))]]

    return "xs", desc, body, lambda xs: rref([mref(v) for v in xs if fref(v)]), inputs, phrasing


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


def _string_function(
    rng: random.Random, family: str, split: str
) -> tuple[str, str, str, Callable[..., Any], Callable, str]:
    _, tks, gk = family.split(":")
    c, d, e = rng.sample("aeinorst", 3)
    n, m = rng.randint(1, 4), rng.randint(2, 4)
    sep, suffix = pick(rng, ("-", "+", ", ", " ", "*", "/")), "".join(rng.sample(string.ascii_lowercase, 2))
    consts = {"c": c, "d": d, "e": e, "n": n, "m": m, "sep": sep, "suffix": suffix}
    transforms = _transforms(c, d, n)
    names = tks.split("+")
    chain = [transforms[t] for t in names]
    gdesc, gcode, gref = _finishers(e, sep, m, suffix)[gk]
    steps = [Step(f"transform:{t}", transforms[t][0], consts) for t in names] + [
        Step(f"finish:{gk}", gdesc, consts)
    ]
    words, phrasing = reword(rng, steps, split)
    desc = "takes the string s, " + ", ".join(words[:-1]) + f", and {words[-1]}"
    body = "return " + gcode.format("s" + "".join(t[1] for t in chain))

    def ref(s: str) -> Any:
        for t in chain:
            s = t[2](s)
        return gref(s)

    def inputs(r: random.Random) -> list[Any]:
        w = (
            pick(r, WORDS)
            if r.random() < 0.5
            else "".join(r.choice("aeinorstlmpu") for _ in range(r.randint(3, 9)))
        )
        return [w]

    return "s", desc, body, ref, inputs, phrasing


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


def _number_function(
    rng: random.Random, family: str, split: str
) -> tuple[str, str, str, Callable[..., Any], Callable, str]:
    ops = family.split(":")[1].split("-")
    chain, steps = [], []
    for op in ops:  # fresh constants for every step
        consts = {"a": rng.randint(2, 9), "b": rng.randint(1, 30), "m": rng.randint(2, 9)}
        chain.append(_arith(**consts)[op])
        steps.append(Step(f"arith:{op}", chain[-1][0], consts))
    words, phrasing = reword(rng, steps, split)
    desc = "takes the integer x, " + ", ".join(words[:-1]) + f", then {words[-1]}, and returns it"
    body = "\n    ".join(f"x = {s[1]}" for s in chain) + "\n    return x"

    def ref(x: int) -> int:
        for s in chain:
            x = s[2](x)
        return x

    return "x", desc, body, ref, lambda r: [r.randint(-20, 60)], phrasing


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
    version = 3  # 3: a held-out wording of one step in every val and test description (`phrasing`)
    max_new_tokens = 96
    num_tests = 6
    split_keys = ("family", "template", "phrasing")

    def generate(self, rng: random.Random, split: str) -> Example:
        kind = pick(rng, sorted(KINDS))
        family = pick(rng, SPLIT_FAMILIES[split][kind])
        sig, desc, body, ref, gen, phrasing = KINDS[kind][1](rng, family, split)
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
            keys={"family": family, "template": f"{split}{t}", "phrasing": phrasing},
        )

    def score(self, example: Example, completion: str) -> bool:
        return run_tests(extract_code(completion), example.answer["func"], example.answer["tests"]).ok

    def score_many(self, examples: list[Example], completions: list[str]) -> list[bool]:
        with ThreadPoolExecutor(max_workers=4) as pool:  # each check is its own process
            return list(pool.map(self.score, examples, completions))
