"""Running model-written Python safely enough to score it.

Three layers, each enough to stop the obvious escapes and together meant to stop the less obvious ones:
1. a static check of the syntax tree: no imports, no names or attributes starting with an underscore (no dunder
   walks such as `().__class__.__subclasses__()`), none of the builtins that reach files, code or the interpreter
   (`open`, `exec`, `eval`, `compile`, `getattr`, `globals`, ...);
2. the code runs with a small whitelist of builtins (no `__import__`, no `open`), so an import cannot succeed even if
   the check missed one: no file or network access is reachable from the code;
3. in a separate `python -I -S` process (isolated: no site packages, no environment, no user directory, its own
   session) in an empty temporary directory, which sets its resource limits (CPU seconds, address space, no file
   writes, few descriptors, no child processes) before it compiles the code, under a wall-clock timeout. (The
   limits are set by the child itself rather than in a `preexec_fn`, which is unsafe in a threaded parent.)
"""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
import tempfile
from typing import Any

FORBIDDEN_NAMES = frozenset(
    {
        "open",
        "exec",
        "eval",
        "compile",
        "__import__",
        "input",
        "breakpoint",
        "globals",
        "locals",
        "vars",
        "getattr",
        "setattr",
        "delattr",
        "hasattr",
        "memoryview",
        "help",
        "exit",
        "quit",
        "dir",
        "type",
        "object",
        "super",
        "classmethod",
        "staticmethod",
        "property",
        "__builtins__",
        "__loader__",
        "__spec__",
    }
)

SAFE_BUILTINS = (
    "abs",
    "all",
    "any",
    "bool",
    "chr",
    "dict",
    "divmod",
    "enumerate",
    "filter",
    "float",
    "frozenset",
    "int",
    "isinstance",
    "len",
    "list",
    "map",
    "max",
    "min",
    "ord",
    "pow",
    "range",
    "reversed",
    "round",
    "set",
    "sorted",
    "str",
    "sum",
    "tuple",
    "zip",
    "ValueError",
    "TypeError",
    "IndexError",
    "KeyError",
    "ZeroDivisionError",
    "Exception",
    "True",
    "False",
    "None",
)

# Runs inside the sandbox process: reads {"code", "func", "tests"} from stdin, prints one JSON line.
_RUNNER = r"""
import builtins, json, sys
req = json.loads(sys.stdin.read())
try:  # limits first, before any model-written code exists in this process
    import resource
    for name, value in req["limits"].items():
        if hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (value, value))
except (ImportError, ValueError, OSError) as e:
    sys.stdout.write(json.dumps({"passed": 0, "total": len(req["tests"]), "error": "limits: " + str(e)}))
    sys.exit(0)
safe = {n: getattr(builtins, n) for n in req["builtins"] if hasattr(builtins, n)}
safe["print"] = lambda *a, **k: None
def norm(v):
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    if isinstance(v, dict):
        return {str(k): norm(x) for k, x in v.items()}
    return v
out = {"passed": 0, "total": len(req["tests"]), "error": None}
try:
    env = {"__builtins__": safe}
    exec(compile(req["code"], "<model>", "exec"), env)
    fn = env.get(req["func"])
    if not callable(fn):
        raise NameError("no function " + req["func"])
    for args, expected in req["tests"]:
        try:
            if norm(fn(*args)) == norm(expected):
                out["passed"] += 1
        except Exception:
            pass
except BaseException as e:
    out["error"] = type(e).__name__ + ": " + str(e)[:200]
sys.stdout.write(json.dumps(out))
"""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: int
    total: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.total > 0 and self.passed == self.total


def check_source(code: str) -> str | None:
    """Why `code` may not run (a short reason), or None when it passes the static check."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return f"syntax error: {e.msg} (line {e.lineno})"
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return "imports are not allowed"
        if isinstance(node, (ast.Global, ast.Nonlocal, ast.AsyncFunctionDef, ast.Await, ast.ClassDef)):
            return f"{type(node).__name__} is not allowed"
        if isinstance(node, ast.Name) and (node.id in FORBIDDEN_NAMES or node.id.startswith("_")):
            return f"name {node.id!r} is not allowed"
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            return f"attribute {node.attr!r} is not allowed"
        if isinstance(node, ast.arg) and node.arg.startswith("__"):
            return f"argument {node.arg!r} is not allowed"
    return None


def run_tests(
    code: str,
    func: str,
    tests: list[tuple[list[Any], Any]],
    *,
    timeout_s: float = 5.0,
    memory_bytes: int = 512 << 20,
) -> SandboxResult:
    """Run `func(*args)` of `code` against each (args, expected) in a sandboxed process."""
    reason = check_source(code)
    if reason is not None:
        return SandboxResult(0, len(tests), f"rejected: {reason}")
    cpu = max(1, int(timeout_s))
    limits = {
        "RLIMIT_CPU": cpu,
        "RLIMIT_AS": memory_bytes,
        "RLIMIT_FSIZE": 0,
        "RLIMIT_NOFILE": 16,
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": 0,
    }
    payload = json.dumps(
        {"code": code, "func": func, "tests": tests, "builtins": SAFE_BUILTINS, "limits": limits}
    )
    with tempfile.TemporaryDirectory(prefix="sunray-sandbox-") as cwd:
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _RUNNER],
                input=payload,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                cwd=cwd,
                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                start_new_session=True,  # its own process group: nothing it could start outlives the timeout kill
            )
        except subprocess.TimeoutExpired:
            return SandboxResult(0, len(tests), f"timeout after {timeout_s:g} s")
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        err = (proc.stderr or "").strip().splitlines()
        return SandboxResult(
            0, len(tests), f"sandbox exited {proc.returncode}: {err[-1] if err else 'no output'}"
        )
    return SandboxResult(int(res["passed"]), int(res["total"]), res.get("error"))
