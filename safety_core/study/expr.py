"""The study file's one small expression language, for `${...}` references in stage configs
and for the rules of `checks`.

An expression is a Python expression restricted to: numbers, strings, lists, the operators
+ - * / // % and comparisons, `and` / `or` / `not`, the functions in FUNCTIONS, and dotted names
(`vars.attack.steps`, `stages.lora.adapter`) looked up in a nested mapping. Nothing else parses,
so a study file cannot run code. Imports nothing of the project.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

FUNCTIONS: dict[str, Callable] = {"max": max, "min": min, "abs": abs, "int": int, "float": float,
                                  "round": round, "str": str}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}
_REFERENCE = re.compile(r"\$\{([^{}]*)\}")


class ExprError(ValueError):
    pass


def parse(text: str) -> ast.Expression:
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        import keyword
        words = [w for w in re.findall(r"[A-Za-z_]\w*", text) if keyword.iskeyword(w) and w not in ("and", "or", "not")]
        why = f"; {words[0]!r} is a Python keyword, so no name may be it (e.g. lam for lambda)" if words else ""
        raise ExprError(f"{text!r} is not an expression ({e.msg}){why}") from None
    for node in ast.walk(tree):
        allowed = (ast.Expression, ast.Name, ast.Attribute, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Compare,
                   ast.BoolOp, ast.Call, ast.List, ast.Tuple, ast.Load, ast.And, ast.Or, ast.Not, ast.USub,
                   ast.UAdd, *_BINARY, *_COMPARE)
        if not isinstance(node, allowed):
            raise ExprError(f"{text!r}: {type(node).__name__} is not allowed (numbers, names, + - * / // %, "
                            f"comparisons, and/or/not, and {', '.join(FUNCTIONS)} only)")
        if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Name) or node.keywords):
            raise ExprError(f"{text!r}: only plain calls like max(a, b) are allowed")
    return tree


def dotted(node: ast.AST) -> tuple[str, ...] | None:
    """('stages', 'lora', 'adapter') for the name `stages.lora.adapter`; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return (node.id, *reversed(parts))
    return None


def names(tree: ast.AST) -> list[tuple[str, ...]]:
    """Every dotted name an expression reads (the longest chain, not its prefixes)."""
    found, inner = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            inner.add(id(node.value))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)) and id(node) not in inner:
            chain = dotted(node)
            if chain and not (isinstance(node, ast.Name) and _is_callee(tree, node)):
                found.append(chain)
    return found


def calls(tree: ast.AST) -> list[tuple[str, list[ast.AST]]]:
    """(function name, argument nodes) of every call in the expression."""
    return [(n.func.id, n.args) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _is_callee(tree: ast.AST, name: ast.Name) -> bool:
    return any(isinstance(n, ast.Call) and n.func is name for n in ast.walk(tree))


def lookup(scope: Mapping, chain: tuple[str, ...]) -> Any:
    value: Any = scope
    for i, part in enumerate(chain):
        if not isinstance(value, Mapping) or part not in value:
            where = ".".join(chain[:i]) or "the top level"
            have = sorted(value) if isinstance(value, Mapping) else f"a value ({value!r})"
            raise ExprError(f"{'.'.join(chain)}: {where} has no {part!r}; it has: {have}")
        value = value[part]
    return value


def evaluate(tree: ast.AST, scope: Mapping, call: Callable | None = None) -> Any:
    """The value of a parsed expression; `call(name, arg_nodes)` answers calls that are not
    FUNCTIONS (a check's `hrr(lora)`)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            chain = dotted(node)
            if chain is None:
                raise ExprError("attributes are read from names only")
            return lookup(scope, chain)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            return not v if isinstance(node.op, ast.Not) else (-v if isinstance(node.op, ast.USub) else +v)
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.BoolOp):
            values = [ev(v) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Compare):
            left = ev(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                right = ev(right_node)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Call):
            if node.func.id in FUNCTIONS:
                return FUNCTIONS[node.func.id](*[ev(a) for a in node.args])
            if call is None:
                raise ExprError(f"unknown function {node.func.id!r}; allowed: {', '.join(FUNCTIONS)}")
            return call(node.func.id, node.args)
        raise ExprError(f"cannot evaluate {type(node).__name__}")
    try:
        return ev(tree)
    except (TypeError, ZeroDivisionError) as e:
        raise ExprError(str(e)) from None


def is_constant(node: ast.AST) -> bool:
    return not any(isinstance(n, (ast.Name, ast.Call)) for n in ast.walk(node))


def headline(tree: ast.Expression) -> ast.AST:
    """What a rule reports as its value: the first operand of its first comparison that is not a
    constant (`hrr(lora) - hrr(aligned)` of `hrr(lora) - hrr(aligned) >= 0.2`; the middle of
    `-0.05 <= x <= 0.05`)."""
    node = tree.body
    while isinstance(node, ast.BoolOp):
        node = node.values[0]
    if isinstance(node, ast.Compare):
        return next((n for n in [node.left, *node.comparators] if not is_constant(n)), node.left)
    return node


# -- `${...}` in strings --------------------------------------------------------------------------

def references(text: str) -> list[str]:
    """The expressions inside `${...}` of a string."""
    return _REFERENCE.findall(text)


def substitute(text: str, scope: Mapping) -> Any:
    """A string with `${...}` references filled in. A string that is exactly one reference takes
    the value's own type (a number stays a number); otherwise each value is written into the text."""
    found = _REFERENCE.fullmatch(text.strip())
    if found:
        return evaluate(parse(found.group(1)), scope)
    return _REFERENCE.sub(lambda m: str(evaluate(parse(m.group(1)), scope)), text)


def walk_strings(value: Any, fn: Callable[[str, str], Any], where: str = "") -> Any:
    """A copy of a nested YAML value with fn(string, its dotted key) applied to every string."""
    if isinstance(value, str):
        return fn(value, where)
    if isinstance(value, Mapping):
        return {k: walk_strings(v, fn, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [walk_strings(v, fn, f"{where}[{i}]") for i, v in enumerate(value)]
    return value
