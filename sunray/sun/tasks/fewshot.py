"""A task with worked train examples before each prompt (`math-fewshot3`: the math task, three shots).

Under SUN the prefill module can change only the prompt's KV; the frozen decoder writes the reply. Worked
examples in the prompt put the reply's format and its kind of arithmetic where the decoder reads them, as few-shot
prompting does for a base model (issue 15 item 3's format try). Every method trains and is tested on the same
prompts, so the comparison with full fine-tuning stays fair.

The shots of an example are drawn from the train split only, by a generator seeded with the task, the split and
the example's index (the same on every machine), never the example itself. A test example's own split keys are
unchanged: its template, structure and answer are still held out of train; only the solved train problems
before it are train's, as in any few-shot evaluation.
"""

from __future__ import annotations

import random
import re

from sunray.sun.tasks.base import Example, Task, check_split

MAX_SHOTS = 8
SPEC = re.compile(r"^(?P<base>[a-z][\w-]*?)-fewshot(?P<shots>\d+)$")


class FewShotTask(Task):
    def __init__(self, base: Task, shots: int) -> None:
        if not 1 <= shots <= MAX_SHOTS:
            raise ValueError(f"{base.name}-fewshot{shots}: shots must be 1 to {MAX_SHOTS}")
        if not base.examples_or_empty("train"):
            raise ValueError(
                f"{base.name}-fewshot{shots}: task {base.name!r} has no train split to take shots from"
            )
        self.base, self.shots = base, shots
        self.name = f"{base.name}-fewshot{shots}"
        self.version = getattr(base, "version", 0)
        self.max_new_tokens = base.max_new_tokens
        self.split_sizes = base.split_sizes
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        check_split(split)
        if split not in self._cache:
            train = self.base.examples("train")
            self._cache[split] = [
                self._with_shots(ex, split, i, train) for i, ex in enumerate(self.base.examples(split))
            ]
        out = self._cache[split]
        if n is not None and n > len(out):
            raise ValueError(f"task {self.name!r} has {len(out)} {split} examples, {n} were asked for")
        return out if n is None else out[:n]

    def _with_shots(self, ex: Example, split: str, index: int, train: list[Example]) -> Example:
        if ex.messages is not None:
            raise ValueError(f"task {self.name!r}: few-shot prompts need single-turn examples")
        rng = random.Random(f"sunray-{self.name}-{split}-{index}")
        own = index if split == "train" else -1  # a train example is never its own shot
        picks: list[int] = []
        while len(picks) < self.shots:
            j = rng.randrange(len(train))
            if j != own and j not in picks:
                picks.append(j)
        worked = "\n\n".join(f"Problem: {train[j].prompt}\nSolution: {train[j].response}" for j in picks)
        prompt = f"Solved examples:\n\n{worked}\n\nNow solve this one the same way.\nProblem: {ex.prompt}"
        return Example(prompt=prompt, response=ex.response, answer=ex.answer, keys=ex.keys)

    def score(self, example: Example, completion: str) -> bool:
        return self.base.score(example, completion)

    def score_many(self, examples: list[Example], completions: list[str]) -> list[bool]:
        return self.base.score_many(examples, completions)
