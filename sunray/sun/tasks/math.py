"""Math word problems with a numeric answer (a small GSM8K-like family). The reference response shows the
arithmetic and ends with "The answer is N."; the scorer compares that number (exact match)."""

from __future__ import annotations

import random
import re

from sunray.sun.tasks.base import Example, GeneratedTask, pick

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
FOODS = ("sandwich", "notebook", "ticket", "toy car", "cupcake", "pen", "comic book")

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


class MathTask(GeneratedTask):
    name = "math"
    max_new_tokens = 64

    def generate(self, rng: random.Random) -> Example:
        kind = rng.randrange(8)
        name, item = pick(rng, NAMES), pick(rng, ITEMS)
        if kind == 0:
            a, b = rng.randint(2, 60), rng.randint(2, 40)
            q = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
            steps, ans = f"{a} + {b} = {a + b}.", a + b
        elif kind == 1:
            a = rng.randint(10, 90)
            b = rng.randint(1, a - 1)
            q = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?"
            steps, ans = f"{a} - {b} = {a - b}.", a - b
        elif kind == 2:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy in total?"
            steps, ans = f"{a} * {b} = {a * b}.", a * b
        elif kind == 3:
            per, k = rng.randint(2, 12), rng.randint(2, 9)
            total = per * k
            q = f"{name} shares {total} {item} equally among {k} friends. How many {item} does each friend get?"
            steps, ans = f"{total} / {k} = {per}.", per
        elif kind == 4:
            a, b = rng.randint(5, 50), rng.randint(2, 30)
            c = rng.randint(1, a + b - 1)
            q = (
                f"{name} has {a} {item}, finds {b} more, and then loses {c}. "
                f"How many {item} does {name} have now?"
            )
            steps, ans = f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c
        elif kind == 5:
            food = pick(rng, FOODS)
            price, n = rng.randint(2, 9), rng.randint(2, 6)
            paid = pick(rng, [v for v in (10, 20, 50, 100) if v >= price * n])
            q = f"A {food} costs {price} dollars. {name} buys {n} of them and pays with {paid} dollars. How much change does {name} get?"
            steps, ans = (
                f"{n} * {price} = {price * n}. {paid} - {price * n} = {paid - price * n}.",
                paid - price * n,
            )
        elif kind == 6:
            speed, hours = rng.randint(3, 15) * 5, rng.randint(2, 8)
            q = f"A train travels {speed} km every hour. How many km does it travel in {hours} hours?"
            steps, ans = f"{speed} * {hours} = {speed * hours}.", speed * hours
        else:
            per, days, extra = rng.randint(3, 20), rng.randint(2, 7), rng.randint(1, 30)
            q = f"{name} reads {per} pages every day for {days} days and then {extra} more pages. How many pages does {name} read in total?"
            steps, ans = (
                f"{per} * {days} = {per * days}. {per * days} + {extra} = {per * days + extra}.",
                per * days + extra,
            )
        return Example(prompt=q, response=f"{steps} The answer is {ans}.", answer=ans)

    def score(self, example: Example, completion: str) -> bool:
        got = extract_answer(completion)
        return got is not None and abs(got - float(example.answer)) < 1e-6
