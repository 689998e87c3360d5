"""What every task is: examples (prompt, reference response, what the scorer needs) in three splits, and a scorer."""

from __future__ import annotations

import abc
import dataclasses
import random
from collections.abc import Callable
from typing import Any

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Example:
    """One task example.

    `prompt` is a single user turn; `messages` (chat data) replaces it with several turns, the assistant's reply
    excluded. `response` is the reference reply the model is trained on; `answer` is what the scorer checks
    (a number, hidden unit tests, an expected function call).
    """

    prompt: str
    response: str
    answer: Any = None
    messages: tuple[dict[str, str], ...] | None = None

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


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")


class GeneratedTask(Task):
    """A task whose examples come from a seeded generator. Splits never share a prompt: test is drawn first, then
    val without test's prompts, then train without either."""

    version = 1  # bump when the generator changes: the splits change with it

    def __init__(self) -> None:
        self._cache: dict[str, list[Example]] = {}

    @abc.abstractmethod
    def generate(self, rng: random.Random) -> Example:
        """One random example."""

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        check_split(split)
        if split not in self._cache:
            taken: set[str] = set()
            for s in ("test", "val", "train"):
                self._cache[s] = self._draw(s, self.split_sizes[s], taken)
                if s == split:
                    break
        out = self._cache[split]
        if n is not None and n > len(out):
            raise ValueError(f"task {self.name!r} has {len(out)} {split} examples, {n} were asked for")
        return out if n is None else out[:n]

    def _draw(self, split: str, size: int, taken: set[str]) -> list[Example]:
        rng = random.Random(
            f"sunray-{self.name}-v{self.version}-{split}"
        )  # str seeds hash the same everywhere
        out: list[Example] = []
        tries = 0
        while len(out) < size:
            tries += 1
            if tries > 50 * size:
                raise RuntimeError(f"task {self.name!r}: cannot draw {size} distinct {split} examples")
            ex = self.generate(rng)
            if ex.prompt in taken:
                continue
            taken.add(ex.prompt)
            out.append(ex)
        return out


def pick(rng: random.Random, items: list | tuple) -> Any:
    return items[rng.randrange(len(items))]


ScoreFn = Callable[[Example, str], bool]
