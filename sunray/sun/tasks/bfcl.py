"""BFCL (Berkeley Function Calling Leaderboard, v4) simple and multiple categories from the `bfcl-eval` package's
own data files: held-out test sets for tool-calling models. They have no train or val split.

`bfcl-eval` depends on dozens of heavy packages (provider SDKs, sentence-transformers, faiss, a pinned numpy 1.26)
that reading its data does not need, and its checker cannot be imported without them; so install it with
`pip install --no-deps bfcl-eval` and this module reads `bfcl_eval/data/BFCL_v4_simple_python.json` (400 questions,
one function each) and `BFCL_v4_multiple.json` (200 questions, 2-4 functions to choose from) and their
`possible_answer/` files directly, and checks calls with its own AST matcher (`check_call`), the rules of BFCL's
`simple_function_checker` for Python: the right function; every required parameter; no parameter outside the
schema or the possible answer; the schema's type (an int passes as a float; a tuple as a list; the elements of an
array are checked one level deep); a value among the possible answers (strings compared without case, spaces and
`,./-_*^`; dicts and lists of dicts key by key); an omitted parameter only where the possible answers allow "".

The prompt lists the functions as JSON schemas in the generated tool task's layout and asks for the same reply
(`{"name": ..., "arguments": {...}}`), so a model trained on `tool` can be evaluated here; a Python call
(`name(a=1, b="x")`, BFCL's own format, optionally in brackets) is accepted too.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from sunray.sun.tasks.base import Example, Task, check_split
from sunray.sun.tasks.tool import parse_call

PACKAGE = "bfcl_eval"
CATEGORIES = {"simple": "BFCL_v4_simple_python.json", "multiple": "BFCL_v4_multiple.json"}
INSTALL_HINT = (
    "pip install --no-deps bfcl-eval (its data files are all that is read; its dependencies are not needed)"
)
PY_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}


# -- data -------------------------------------------------------------------------------------------------------
def _read_jsonl(rel: str) -> list[dict[str, Any]]:
    import importlib.resources

    try:
        root = importlib.resources.files(PACKAGE) / "data"
    except ModuleNotFoundError:
        raise ValueError(f"the BFCL tasks need the bfcl-eval package: {INSTALL_HINT}") from None
    return [
        json.loads(line) for line in (root / rel).read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def load_category(category: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(question entry, possible-answer entry) pairs of a category, in the package's order."""
    questions = _read_jsonl(CATEGORIES[category])
    answers = {a["id"]: a for a in _read_jsonl(f"possible_answer/{CATEGORIES[category]}")}
    return [(q, answers[q["id"]]) for q in questions]


def schema(function: dict[str, Any]) -> dict[str, Any]:
    """A BFCL function description in the tool task's layout: name, description, parameters, required."""
    params = function.get("parameters") or {}
    return {
        "name": function["name"],
        "description": function.get("description", ""),
        "parameters": params.get("properties", {}),
        "required": params.get("required", []),
    }


def _first(options: list[Any], spec: dict[str, Any] | None, required: bool = False) -> tuple[bool, Any]:
    """The first allowed value of a parameter (False when the first choice is to leave it out; a required one is
    never left out, even where its possible answers begin with "")."""
    given = [o for o in options if o != ""]
    if not given or (options[0] == "" and not required):
        return False, None
    value = given[0]
    if isinstance(value, dict):  # a dict whose values are lists of options
        return True, _first_dict(value)
    items = (spec or {}).get("items") or {}
    if isinstance(value, list) and items.get("type") == "dict":  # a list of such dicts
        return True, [_first_dict(d) if isinstance(d, dict) else d for d in value]
    return True, value


def _first_dict(options: dict[str, list[Any]]) -> dict[str, Any]:
    out = {}
    for k, opts in options.items():
        keep, v = _first(opts, None)
        if keep:
            out[k] = v
    return out


def reference_call(function: dict[str, Any], possible: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """A call that the possible answers accept: the first option of every parameter."""
    ((name, answers),) = possible.items()
    params = function.get("parameters") or {}
    props, required = params.get("properties", {}), params.get("required", [])
    args = {}
    for p, opts in answers.items():
        keep, v = _first(opts, props.get(p), p in required)
        if keep:
            args[p] = v
    return {"name": name, "arguments": args}


# -- parsing ----------------------------------------------------------------------------------------------------
def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def parse_python_call(text: str) -> dict[str, Any] | None:
    """`name(a=1, b='x')` or `[name(...)]` (BFCL's format) as {"name", "arguments"}; None if it is not one call."""
    text = extract_block(text).strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    if isinstance(tree, ast.List) and len(tree.elts) == 1:
        tree = tree.elts[0]
    if not isinstance(tree, ast.Call) or tree.args or _dotted(tree.func) is None:
        return None
    try:
        args = {kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords if kw.arg}
    except (ValueError, SyntaxError):
        return None
    return {"name": _dotted(tree.func), "arguments": args}


_FENCE = re.compile(r"```(?:\w+)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_block(text: str) -> str:
    m = _FENCE.search(text)
    return m.group(1) if m else text


def parse_completion(completion: str) -> dict[str, Any] | None:
    call = parse_call(completion)
    if call is not None and set(call) == {"name", "arguments"} and isinstance(call["arguments"], dict):
        return call
    return parse_python_call(completion)


# -- checking ---------------------------------------------------------------------------------------------------
def standardize(s: str) -> str:
    """BFCL's string normalization: no spaces or `,./-_*^`, lower case, single quotes as double."""
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def _std(v: Any) -> Any:
    return standardize(v) if isinstance(v, str) else v


def _value_ok(v: Any, options: list[Any]) -> bool:
    if isinstance(v, str):
        return standardize(v) in [standardize(o) for o in options if isinstance(o, str)]
    if isinstance(v, list):
        return [_std(x) for x in v] in [[_std(x) for x in o] for o in options if isinstance(o, list)]
    return v in options


def _dict_ok(v: dict[str, Any], candidates: list[Any]) -> bool:
    for cand in candidates:
        if not isinstance(cand, dict):
            continue
        if all(k in cand and _std(x) in [_std(o) for o in cand[k]] for k, x in v.items()) and all(
            k in v or "" in opts for k, opts in cand.items()
        ):
            return True
    return False


def _list_of_dicts_ok(v: list[Any], candidates: list[Any]) -> bool:
    return any(
        isinstance(cand, list)
        and len(cand) == len(v)
        and all(isinstance(x, dict) and _dict_ok(x, [c]) for x, c in zip(v, cand))
        for cand in candidates
    )


def _type_ok(v: Any, want: type, options: list[Any]) -> tuple[bool, bool]:
    """(type acceptable, the value is a "variable": the possible answers hold another type than the schema)."""
    answer_type = next((type(o) for o in options if o != ""), None)
    if type(v) is want:
        return True, answer_type is not None and answer_type is not want
    return answer_type is not None and type(v) is answer_type, True


def check_call(
    functions: list[dict[str, Any]], call: dict[str, Any] | None, possible: dict[str, dict[str, list[Any]]]
) -> tuple[bool, str]:
    """(accepted, why not) for a parsed call against the possible answers of one BFCL question."""
    if call is None:
        return False, "no function call found"
    ((name, answers),) = possible.items()
    if call.get("name") != name:
        return False, f"function {call.get('name')!r}, expected {name!r}"
    function = next((f for f in functions if f["name"] == name), None)
    if function is None:
        return False, f"no description of {name!r}"
    params = function.get("parameters") or {}
    props, required = params.get("properties", {}), params.get("required", [])
    args = call.get("arguments")
    if not isinstance(args, dict):
        return False, "arguments are not an object"
    for p in required:
        if p not in args:
            return False, f"missing required parameter {p!r}"
    for p, v in args.items():
        if p not in props or p not in answers:
            return False, f"unexpected parameter {p!r}"
        spec, options = props[p], answers[p]
        typ = spec.get("type", "any")
        want = PY_TYPES.get(typ, str)
        if typ == "tuple" and isinstance(v, tuple):
            v = list(v)
        if typ == "float" and type(v) is int:
            v = float(v)
        ok, variable = _type_ok(v, want, options)
        if not ok:
            return False, f"parameter {p!r}: type {type(v).__name__}, expected {typ}"
        nested = (
            PY_TYPES.get((spec.get("items") or {}).get("type", "")) if typ in ("array", "tuple") else None
        )
        if not variable and want is list and nested is not None and nested is not dict:
            element_types = {type(x) for o in options if isinstance(o, list) for x in o}
            if any(type(x) is not nested and type(x) not in element_types for x in v):
                return False, f"parameter {p!r}: an element of another type than {nested.__name__}"
        if variable:  # BFCL compares a variable as it is
            ok = v in options
        elif want is dict:
            ok = _dict_ok(v, options)
        elif want is list and nested is dict:
            ok = _list_of_dicts_ok(v, options)
        else:
            ok = _value_ok(v, options)
        if not ok:
            return False, f"parameter {p!r}: {v!r} is not among {options!r}"
    for p, opts in answers.items():
        if p not in args and "" not in opts:
            return False, f"parameter {p!r} left out but not optional"
    return True, ""


# -- the task ---------------------------------------------------------------------------------------------------
def question_example(category: str, q: dict[str, Any], a: dict[str, Any]) -> Example:
    functions = q["function"]
    possible = a["ground_truth"][0]
    request = " ".join(m["content"] for m in q["question"][0] if m["role"] == "user")
    schemas = "\n".join(json.dumps(schema(f), separators=(",", ":")) for f in functions)
    prompt = (
        f"You can call these tools:\n{schemas}\n"
        'Answer with one JSON function call {"name": ..., "arguments": {...}} and nothing else.\n'
        f"Request: {request}"
    )
    (name,) = possible
    function = next(f for f in functions if f["name"] == name)
    ref = reference_call(function, possible)
    return Example(
        prompt=prompt,
        response=json.dumps(ref),
        answer={"functions": functions, "possible": possible},
        keys={"id": q["id"], "category": category},
    )


class BFCLTask(Task):
    """BFCL categories (default: simple and multiple) as one test split."""

    version = 1
    max_new_tokens = 160
    categories: tuple[str, ...] = ("simple", "multiple")

    def __init__(self) -> None:
        self.name = "bfcl" if len(self.categories) > 1 else f"bfcl-{self.categories[0]}"
        self._test = [question_example(c, q, a) for c in self.categories for q, a in load_category(c)]
        self.split_sizes = {"train": 0, "val": 0, "test": len(self._test)}

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        check_split(split)
        if split != "test":
            raise ValueError(
                f"task {self.name!r} is a held-out test set with no {split} split: train on the tool task and "
                f"evaluate with --task {self.name}"
            )
        return self._test if n is None else self._test[:n]

    def examples_or_empty(self, split: str) -> list[Example]:
        return self._test if split == "test" else []

    def score(self, example: Example, completion: str) -> bool:
        ok, _ = check_call(
            example.answer["functions"], parse_completion(completion), example.answer["possible"]
        )
        return ok


class BFCLSimpleTask(BFCLTask):
    categories = ("simple",)


class BFCLMultipleTask(BFCLTask):
    categories = ("multiple",)
