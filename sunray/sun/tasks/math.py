"""Math word problems with a numeric answer (a small GSM8K-like family), made by composing steps.

A problem starts with a quantity and applies two or three operations to it, one sentence each (add, take away,
multiply, divide, add groups, take away groups; several phrasings each), then asks for the result. The reference
response shows the arithmetic, one equation per operation (two for a group), and ends with "The answer is N.";
the scorer compares that number (exact match).

Split keys (`Example.keys`), none of which a test example shares with train:
- `structure`: the sequence of operations (e.g. `add-mul-sub`); whole structures are held out, so a test problem
  chains operations in an order and combination never trained on (every single operation is trained on);
- `template`: the structure with the phrasing of every sentence (implied by the structure split);
- `question`: the phrasing of the final question (test and val ask in their own words);
- `answer`: the final number (test answers are numbers that no train problem has as its answer).
"""

from __future__ import annotations

import itertools
import random
import re

from sunray.sun.tasks.base import Example, GeneratedTask, owner, partition, pick

NAMES = (
    "Tom",
    "Anna",
    "Liam",
    "Mia",
    "Noah",
    "Emma",
    "Lucas",
    "Sofia",
    "Ben",
    "Lena",
    "Omar",
    "Yuna",
    "Ravi",
    "Chloe",
)
ITEMS = ("apples", "books", "stickers", "marbles", "pencils", "cookies", "cards", "shells", "stamps", "coins")

STARTS = ("{n} has {a} {item}.", "{n} starts with {a} {item}.", "At first {n} owns {a} {item}.")
# One sentence per operation; {b} is an amount, {k} a factor or a number of groups.
PHRASES: dict[str, tuple[str, ...]] = {
    "add": ("{n} finds {b} more.", "A friend gives {n} {b} more.", "{n} buys {b} more."),
    "sub": ("{n} loses {b}.", "{n} gives {b} away.", "{n} uses up {b} of them."),
    "mul": ("Then {n} has {k} times as many.", "After a trade, {n} has {k} times as many."),
    "div": ("{n} splits them into {k} equal piles and keeps one pile.", "{n} keeps one of {k} equal shares."),
    "addgroups": ("{n} buys {k} packs of {b}.", "{n} gets {k} bags with {b} {item} in each."),
    "subgroups": ("{n} gives {b} to each of {k} friends.", "{n} sells {k} boxes of {b}."),
}
OPS = tuple(PHRASES)
QUESTIONS = {
    "train": (
        "How many {item} does {n} have now?",
        "How many {item} does {n} have in the end?",
        "How many {item} are with {n} now?",
    ),
    "val": ("How many {item} does {n} end up with?",),
    "test": ("What is the number of {item} {n} has at the end?", "Count the {item} {n} has now."),
}
# Two or three operations, at most one of them with groups (two equations), so that no worked answer has more
# than four equations.
STRUCTURES = {
    k: tuple(
        "-".join(s) for s in itertools.product(OPS, repeat=k) if sum(op.endswith("groups") for op in s) <= 1
    )
    for k in (2, 3)
}
SPLIT_STRUCTURES = {k: partition(v, f"math-structure-{k}", test=0.2, val=0.1) for k, v in STRUCTURES.items()}
ANSWER_TEST, ANSWER_VAL = 0.2, 0.1  # the shares of the numbers that only test / only val may have as answer
MAX_VALUE = 200  # no quantity along the way is larger

_ANSWER = re.compile(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def _parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def extract_answer(completion: str) -> float | None:
    """The number after "The answer is", else the last number in the text; None when there is no number."""
    m = _ANSWER.search(completion)
    if m:
        return _parse_number(m.group(1))
    nums = _NUMBER.findall(completion)
    return _parse_number(nums[-1]) if nums else None


def answer_split(answer: int) -> str:
    return owner(answer, "math-answer", ANSWER_TEST, ANSWER_VAL)


def _apply(rng: random.Random, op: str, x: int) -> tuple[dict[str, int], int, list[str]] | None:
    """Numbers for `op` applied to x: (slots for the sentence, new value, equations), or None if none fit."""
    if op == "add":
        b = rng.randint(2, 30)
        return {"b": b}, x + b, [f"{x}+{b}={x + b}."]
    if op == "sub":
        if x < 3:
            return None
        b = rng.randint(1, min(30, x - 1))
        return {"b": b}, x - b, [f"{x}-{b}={x - b}."]
    if op == "mul":
        if x > 50:
            return None
        k = rng.randint(2, 3)
        return {"k": k}, x * k, [f"{x}*{k}={x * k}."]
    if op == "div":
        ks = [k for k in (2, 3, 4, 5) if x % k == 0 and x // k >= 1]
        if not ks:
            return None
        k = pick(rng, ks)
        return {"k": k}, x // k, [f"{x}/{k}={x // k}."]
    k, b = rng.randint(2, 4), rng.randint(2, 10)
    if op == "addgroups":
        return {"k": k, "b": b}, x + k * b, [f"{k}*{b}={k * b}.", f"{x}+{k * b}={x + k * b}."]
    if k * b >= x:  # subgroups
        return None
    return {"k": k, "b": b}, x - k * b, [f"{k}*{b}={k * b}.", f"{x}-{k * b}={x - k * b}."]


class MathTask(GeneratedTask):
    name = "math"
    max_new_tokens = 80
    split_keys = ("structure", "template", "question", "answer")

    def generate(self, rng: random.Random, split: str) -> Example:
        while True:
            ex = self._try(rng, split)
            if ex is not None:
                return ex

    def _try(self, rng: random.Random, split: str) -> Example | None:
        steps = 2 if rng.random() < 0.6 else 3
        structure = pick(rng, SPLIT_STRUCTURES[steps][split])
        n, item = pick(rng, NAMES), pick(rng, ITEMS)
        x = rng.randint(5, 40)
        s = rng.randrange(len(STARTS))
        sentences = [STARTS[s].format(n=n, a=x, item=item)]
        template = [f"start{s}"]
        work: list[str] = []
        for op in structure.split("-"):
            step = _apply(rng, op, x)
            if step is None:
                return None
            slots, x, eqs = step
            if x > MAX_VALUE:
                return None
            v = rng.randrange(len(PHRASES[op]))
            sentences.append(PHRASES[op][v].format(n=n, item=item, **slots))
            template.append(f"{op}{v}")
            work += eqs
        if answer_split(x) != split:
            return None
        questions = QUESTIONS[split]
        q = rng.randrange(len(questions))
        sentences.append(questions[q].format(n=n, item=item))
        question = f"{split}{q}"
        keys = {
            "structure": structure,
            "template": "|".join([*template, question]),
            "question": question,
            "answer": str(x),
        }
        return Example(
            prompt=" ".join(sentences), response=" ".join(work) + f" The answer is {x}.", answer=x, keys=keys
        )

    def score(self, example: Example, completion: str) -> bool:
        got = extract_answer(completion)
        return got is not None and abs(got - float(example.answer)) < 1e-6
