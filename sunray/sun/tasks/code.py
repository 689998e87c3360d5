"""Short Python functions, scored by running hidden unit tests in the sandbox (`sunray.sun.sandbox`).

The prompt asks for a function (`def solve(...)`, `def f(...)`, ...) doing one small thing; the reference response is the code alone (no markdown
fences). A completion passes when every hidden test passes.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sunray.sun.sandbox import run_tests
from sunray.sun.tasks.base import Example, GeneratedTask, pick

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


def extract_code(completion: str) -> str:
    """The code of a completion: the first fenced block if there is one, else the whole text."""
    m = _FENCE.search(completion)
    return (m.group(1) if m else completion).strip("\n")


def _ints(rng: random.Random, n: int, lo: int = -20, hi: int = 50) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _word(rng: random.Random, must: str = "") -> str:
    """A word; with `must`, often one that contains that letter (so that counting or replacing it matters)."""
    w = (
        pick(rng, WORDS)
        if rng.random() < 0.5
        else "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))
    )
    if must and rng.random() < 0.6:
        i = rng.randrange(len(w) + 1)
        w = w[:i] + must * rng.randint(1, 2) + w[i:]
    return w


# Each family: (args signature, description, reference code, reference function, input generator).
Family = tuple[str, str, str, Callable[..., Any], Callable[[random.Random], list[Any]]]


def _families(rng: random.Random) -> Family:
    a, b = rng.randint(2, 20), rng.randint(-30, 30)
    c, d = rng.sample(string.ascii_lowercase, 2)
    n = rng.randint(2, 9)
    kind = rng.randrange(16)
    if kind == 0:
        return (
            "x",
            f"returns x multiplied by {a}, plus {b}",
            f"return x * {a} + {b}",
            lambda x: x * a + b,
            lambda r: [r.randint(-50, 50)],
        )
    if kind == 1:
        return (
            "x",
            f"returns the square of x plus {b}",
            f"return x * x + {b}",
            lambda x: x * x + b,
            lambda r: [r.randint(-30, 30)],
        )
    if kind == 2:
        return (
            "xs",
            f"returns the sum of the numbers in the list xs that are greater than {b}",
            f"return sum(v for v in xs if v > {b})",
            lambda xs: sum(v for v in xs if v > b),
            lambda r: [_ints(r, r.randint(0, 8), -40, 40)],
        )
    if kind == 3:
        return (
            "s",
            f"returns how many times the character '{c}' appears in the string s",
            f"return s.count('{c}')",
            lambda s: s.count(c),
            lambda r: [_word(r, c)],
        )
    if kind == 4:
        sep = pick(rng, ("-", "+", ", ", " ", "*", "/"))
        return (
            "s",
            f"returns {n} copies of the string s joined by '{sep}'",
            f"return '{sep}'.join([s] * {n})",
            lambda s: sep.join([s] * n),
            lambda r: [_word(r)],
        )
    if kind == 5:
        return (
            "xs",
            f"returns a new list with every number of the list xs multiplied by {a} and then increased by {b}",
            f"return [v * {a} + {b} for v in xs]",
            lambda xs: [v * a + b for v in xs],
            lambda r: [_ints(r, r.randint(0, 6))],
        )
    if kind == 6:
        return (
            "a, b, c",
            f"returns the largest of the three numbers a, b and c, plus {b}",
            f"return max(a, b, c) + {b}",
            lambda x, y, z: max(x, y, z) + b,
            lambda r: _ints(r, 3),
        )
    if kind == 7:
        return (
            "x",
            f"returns True if x is divisible by {a}, and False otherwise",
            f"return x % {a} == 0",
            lambda x: x % a == 0,
            lambda r: [r.choice([r.randint(0, 30) * a, r.randint(0, 500)])],
        )
    if kind == 8:
        return (
            "s",
            f"returns the string s with every '{c}' replaced by '{d}'",
            f"return s.replace('{c}', '{d}')",
            lambda s: s.replace(c, d),
            lambda r: [_word(r, c)],
        )
    if kind == 9:
        where = rng.randrange(3)
        desc = (
            f"the first {n} characters",
            f"the last {n} characters",
            f"everything after the first {n} characters",
        )[where]
        body = (f"s[:{n}]", f"s[-{n}:]", f"s[{n}:]")[where]
        return (
            "s",
            f"returns {desc} of the string s",
            f"return {body}",
            [lambda s: s[:n], lambda s: s[-n:], lambda s: s[n:]][where],
            lambda r: [_word(r)],
        )
    if kind == 10:
        return (
            "n",
            f"returns the sum of the decimal digits of the non-negative integer n, times {a}",
            f"return sum(int(d) for d in str(n)) * {a}",
            lambda k: sum(int(q) for q in str(k)) * a,
            lambda r: [r.randint(0, 99999)],
        )
    if kind == 11:
        rev = rng.random() < 0.5
        desc = "largest to smallest" if rev else "smallest to largest"
        return (
            "xs",
            f"returns the list xs sorted from {desc}, without its first {n} elements",
            f"return sorted(xs, reverse={rev})[{n}:]",
            lambda xs: sorted(xs, reverse=rev)[n:],
            lambda r: [_ints(r, r.randint(0, 12))],
        )
    if kind == 12:
        return (
            "xs",
            f"returns how many numbers in the list xs are divisible by {a}",
            f"return sum(1 for v in xs if v % {a} == 0)",
            lambda xs: sum(1 for v in xs if v % a == 0),
            lambda r: [
                [r.choice([r.randint(-5, 5) * a, r.randint(-100, 100)]) for _ in range(r.randint(0, 8))]
            ],
        )
    if kind == 13:
        return (
            "xs",
            f"returns how many numbers in the list xs are smaller than {b}",
            f"return sum(1 for v in xs if v < {b})",
            lambda xs: sum(1 for v in xs if v < b),
            lambda r: [_ints(r, r.randint(0, 8), -40, 40)],
        )
    if kind == 14:
        return (
            "s",
            f"returns the string s reversed, followed by '{c}{d}'",
            f"return s[::-1] + '{c}{d}'",
            lambda s: s[::-1] + c + d,
            lambda r: [_word(r)],
        )
    return (
        "x, y",
        f"returns x times y minus {a}",
        f"return x * y - {a}",
        lambda x, y: x * y - a,
        lambda r: _ints(r, 2, -20, 20),
    )


FUNCTION_NAMES = ("solve", "f", "compute", "transform", "process", "calc", "answer", "helper", "run", "task")


class CodeTask(GeneratedTask):
    name = "code"
    max_new_tokens = 64
    num_tests = 5

    def generate(self, rng: random.Random) -> Example:
        sig, desc, body, ref, gen = _families(rng)
        func = pick(rng, FUNCTION_NAMES)
        prompt = f"Write a Python function {func}({sig}) that {desc}."
        tests = []
        for _ in range(self.num_tests):
            args = gen(rng)
            tests.append([args, ref(*args)])
        return Example(
            prompt=prompt, response=f"def {func}({sig}):\n    {body}", answer={"func": func, "tests": tests}
        )

    def score(self, example: Example, completion: str) -> bool:
        return run_tests(extract_code(completion), example.answer["func"], example.answer["tests"]).ok

    def score_many(self, examples: list[Example], completions: list[str]) -> list[bool]:
        with ThreadPoolExecutor(max_workers=4) as pool:  # each check is its own process
            return list(pool.map(self.score, examples, completions))
