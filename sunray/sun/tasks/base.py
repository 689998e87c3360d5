"""What every task is: examples (prompt, reference response, what the scorer needs) in three splits, and a scorer."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from typing import Any

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Example:
    """One task example.

    `prompt` is a single user turn; `messages` (chat data) replaces it with several turns, the assistant's reply
    excluded. `response` is the reference reply the model is trained on; `answer` is what the scorer checks
    (a number, hidden unit tests, an expected function call). `keys` (generated tasks) are the example's split
    keys: what it was made from (its template, function family, tool, answer, ...); a value of a key never occurs
    in two splits, so a test example shares none of them with any train example.
    """

    prompt: str
    response: str
    answer: Any = None
    messages: tuple[dict[str, str], ...] | None = None
    keys: dict[str, str] | None = None

    def chat(self) -> list[dict[str, str]]:
        """The turns before the reply, as a chat template takes them."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


class Task(abc.ABC):
    """A task family with deterministic train / val / test splits and a scorer."""

    name: str
    max_new_tokens: int = 96  # enough for every reference response of the task, with room to spare
    split_sizes: dict[str, int] = {"train": 4000, "val": 200, "test": 300}

    @abc.abstractmethod
    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """The first `n` examples of `split` (all of them when n is None); the same on every call and machine."""

    @abc.abstractmethod
    def score(self, example: Example, completion: str) -> bool:
        """Whether `completion` (the model's reply, without the prompt) solves `example`."""

    def score_many(self, examples: list[Example], completions: list[str]) -> list[bool]:
        return [self.score(e, c) for e, c in zip(examples, completions)]

    def fingerprint(self) -> str:
        """What identifies the task's data: `<name>-v<version>-<digest of every example of every split>`. A model
        trained on the task is cached under a key that includes it (`sunray.sun.task_models`), so a change of the
        data (a new generator, another package version of a benchmark) never serves a module trained on the old."""
        h = hashlib.sha256()
        for split in SPLITS:
            for e in self.examples_or_empty(split):
                row = [e.prompt, e.response, e.answer, e.messages, e.keys]
                h.update(json.dumps(row, sort_keys=True, default=str).encode())
                h.update(b"\n")
        return f"{self.name}-v{getattr(self, 'version', 0)}-{h.hexdigest()[:16]}"

    def examples_or_empty(self, split: str) -> list[Example]:
        """`examples(split)`, or [] for a split the task does not have (a benchmark without a train split)."""
        return self.examples(split)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")


class GeneratedTask(Task):
    """A task whose examples come from a seeded generator, split by what they are made of.

    Each example carries split keys (`Example.keys`: template, function family, tool, answer, ...). The generator
    makes an example for a given split out of that split's own templates / families / tools / answers (see
    `partition` and `owner`), so whole templates are held out: no value of a key in `split_keys` occurs in two
    splits, and `examples` checks this as it draws (a generator that breaks it is a bug: RuntimeError). Test is
    drawn first, then val, then train; no prompt occurs twice.
    """

    version = 2  # bump when the generator changes: the splits change with it (and so the task's fingerprint)
    split_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._cache: dict[str, list[Example]] = {}

    @abc.abstractmethod
    def generate(self, rng: random.Random, split: str) -> Example:
        """One random example of `split`, made only of that split's templates / families / tools / answers."""

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        check_split(split)
        if split not in self._cache:
            taken: set[str] = set()
            seen: dict[str, dict[str, str]] = {k: {} for k in self.split_keys}  # key -> value -> split
            for s in ("test", "val", "train"):
                self._cache[s] = self._draw(s, self.split_sizes[s], taken, seen)
                if s == split:
                    break
        out = self._cache[split]
        if n is not None and n > len(out):
            raise ValueError(f"task {self.name!r} has {len(out)} {split} examples, {n} were asked for")
        return out if n is None else out[:n]

    def _draw(self, split: str, size: int, taken: set[str], seen: dict[str, dict[str, str]]) -> list[Example]:
        # String seeds hash the same everywhere.
        rng = random.Random(f"sunray-{self.name}-v{self.version}-{split}")
        out: list[Example] = []
        tries = 0
        while len(out) < size:
            tries += 1
            if tries > 50 * size:
                raise RuntimeError(f"task {self.name!r}: cannot draw {size} distinct {split} examples")
            ex = self.generate(rng, split)
            if ex.prompt in taken:
                continue
            keys = ex.keys or {}
            for k in self.split_keys:
                if k not in keys:
                    raise RuntimeError(f"task {self.name!r}: a {split} example has no split key {k!r}")
                other = seen[k].setdefault(keys[k], split)
                if other != split:
                    raise RuntimeError(
                        f"task {self.name!r}: {k} {keys[k]!r} of a {split} example is also in {other}"
                    )
            taken.add(ex.prompt)
            out.append(ex)
        return out


def _unit(value: str, salt: str) -> float:
    """A number in [0, 1) from a hash of `value` (the same on every machine)."""
    return int(hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()[:12], 16) / float(1 << 48)


def owner(value: Any, salt: str, test: float, val: float) -> str:
    """The split that owns `value` (by a hash): test with probability `test`, val with `val`, else train."""
    u = _unit(str(value), salt)
    return "test" if u < test else "val" if u < test + val else "train"


def partition(items: Sequence[str], salt: str, test: float, val: float) -> dict[str, list[str]]:
    """Split whole `items` (templates, families, tools) into train / val / test: a seeded shuffle of the sorted
    items, the first `test` share to test, the next `val` share to val (each at least one), the rest to train."""
    order = sorted(set(items), key=lambda v: _unit(v, salt))
    n_test, n_val = max(1, round(test * len(order))), max(1, round(val * len(order)))
    if n_test + n_val >= len(order):
        raise ValueError(f"too few items ({len(order)}) to hold out {n_test} for test and {n_val} for val")
    return {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }


def pick(rng: random.Random, items: list | tuple) -> Any:
    return items[rng.randrange(len(items))]


ScoreFn = Callable[[Example, str], bool]
