"""User data as JSONL: one example per line, either

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

In the chat form the last message is the assistant's reply the model learns; the turns before it are the prompt.
A malformed line stops the load with `path:line: reason`; blank lines are skipped. The task scores by exact match
of the reply (whitespace at the ends ignored).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sunray.sun.tasks.base import Example, Task, check_split

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A malformed data file; the message names the file, the line and the reason."""


def _parse_line(obj: Any) -> Example:
    """An Example from one parsed line, or ValueError with the reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            raise ValueError('use either "messages" or "prompt"/"response", not both')
        msgs = obj["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise ValueError('"messages" must be a list of at least two messages')
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise ValueError(f'message {i} must be an object with string "role" and "content"')
            if m["role"] not in ROLES:
                raise ValueError(f"message {i} has role {m['role']!r}; roles: {', '.join(ROLES)}")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"the last message must be the assistant's reply, not {msgs[-1]['role']!r}")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise ValueError("no user message before the assistant's reply")
        if not msgs[-1]["content"].strip():
            raise ValueError("the assistant's reply is empty")
        turns = tuple({"role": m["role"], "content": m["content"]} for m in msgs[:-1])
        last_user = next(m["content"] for m in reversed(turns) if m["role"] == "user")
        return Example(prompt=last_user, response=msgs[-1]["content"], messages=turns)
    missing = [k for k in ("prompt", "response") if k not in obj]
    if missing:
        raise ValueError(f'missing {" and ".join(repr(k) for k in missing)} (or give "messages")')
    for k in ("prompt", "response"):
        if not isinstance(obj[k], str):
            raise ValueError(f'"{k}" must be a string, got {type(obj[k]).__name__}')
        if not obj[k].strip():
            raise ValueError(f'"{k}" is empty')
    return Example(prompt=obj["prompt"], response=obj["response"])


def load_jsonl(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    out: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            try:
                out.append(_parse_line(obj))
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    if not out:
        raise DataError(f"{path}: no examples (the file is empty)")
    return out


class JsonlTask(Task):
    """A task from the user's JSONL file(s). Without separate val/test files, about 5% of the lines (chosen by a
    hash of the prompt, so stable) are held out as val and as test."""

    max_new_tokens = 256

    def __init__(
        self, train: str | Path, val: str | Path | None = None, test: str | Path | None = None
    ) -> None:
        self.name = f"jsonl:{train}"
        self.paths = {
            "train": Path(train),
            "val": Path(val) if val else None,
            "test": Path(test) if test else None,
        }
        rows = load_jsonl(train)
        self._splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
        for s in ("val", "test"):
            if self.paths[s] is not None:
                self._splits[s] = load_jsonl(self.paths[s])
        for ex in rows:
            h = int(hashlib.sha256(ex.prompt.encode()).hexdigest()[:8], 16) % 100
            held = "val" if h < 5 and val is None else "test" if 5 <= h < 10 and test is None else "train"
            self._splits[held].append(ex)
        if not self._splits["train"]:
            raise DataError(f"{train}: no training examples left after holding out val/test lines")
        self.split_sizes = {k: len(v) for k, v in self._splits.items()}
        longest = max(len(e.response) for e in self._splits["train"])
        self.max_new_tokens = max(16, min(1024, longest))  # characters bound tokens from above

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        check_split(split)
        out = self._splits[split]
        return out if n is None else out[:n]

    def score(self, example: Example, completion: str) -> bool:
        return completion.strip() == example.response.strip()
