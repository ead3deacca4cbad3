"""The spec language's expressions: `${4 * d_model}`, `${d_model // heads}`, `${2 if i == 0 else 1}`.

A tiny interpreter over Python's expression grammar (parsed with `ast`, never `eval`ed):
numbers, booleans, names, + - * / // % **, comparisons, and/or/not, `a if c else b`,
parentheses, and the functions min, max, abs. Nothing else is accepted: no attribute access,
subscripts, strings, lambdas or other calls. Errors carry the character offset they refer to.
"""
from __future__ import annotations

import ast
import operator
import re
from typing import Any, Mapping

from .errors import did_you_mean

Number = int | float | bool

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
FUNCTIONS = {"min": min, "max": max, "abs": abs}
_MAX_EXPONENT = 256  # `10 ** 10 ** 10` must fail fast, not hang

INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


class ExprError(Exception):
    def __init__(self, message: str, offset: int, hint: str | None = None):
        super().__init__(message)
        self.message, self.offset, self.hint = message, offset, hint


def evaluate(text: str, names: Mapping[str, Any]) -> Number:
    """Evaluate one expression; offsets in errors are 0-based positions in `text`."""
    indent = len(text) - len(text.lstrip())
    if not text.strip():
        raise ExprError("empty expression", 0)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        offset = indent + (exc.offset or 1) - 1 if exc.lineno in (None, 1) else indent
        raise ExprError(f"invalid expression: {exc.msg}", max(0, min(offset, len(text)))) from None
    try:
        return _Evaluator(names).visit(tree.body)
    except ExprError as exc:
        raise ExprError(exc.message, indent + exc.offset, exc.hint) from None
    except (TypeError, OverflowError, ValueError) as exc:
        raise ExprError(f"cannot evaluate: {exc}", indent) from None


def has_expression(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def substitute(value: str, names: Mapping[str, Any]) -> Any:
    """`"${expr}"` becomes the expression's value; `"block_${i}"` becomes a string."""
    whole = INTERPOLATION.fullmatch(value.strip())
    if whole:
        start = value.index("${") + 2
        return _shifted(whole.group(1), names, start)
    if "${" in value and not INTERPOLATION.search(value):
        raise ExprError("unterminated `${`: expressions are written `${...}`", value.index("${"))
    parts, last = [], 0
    for m in INTERPOLATION.finditer(value):
        parts.append(value[last : m.start()])
        parts.append(str(_shifted(m.group(1), names, m.start(1))))
        last = m.end()
    parts.append(value[last:])
    return "".join(parts)


def _shifted(text: str, names, start: int):
    try:
        result = evaluate(text, names)
    except ExprError as exc:
        raise ExprError(exc.message, start + exc.offset, exc.hint) from None
    if isinstance(result, float) and result.is_integer() and not isinstance(result, bool):
        # 768 / 12 is a size of 64, not 64.0; fractional results stay floats.
        return int(result)
    return result


class _Evaluator:
    def __init__(self, names: Mapping[str, Any]):
        self.names = names

    def visit(self, node: ast.AST):
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            raise ExprError(f"{_describe(node)} is not allowed in an expression", node.col_offset,
                            hint="expressions use numbers, names, + - * / // % **, comparisons, `a if c else b`, min, max, abs")
        return method(node)

    def visit_Constant(self, node: ast.Constant):
        if isinstance(node.value, (int, float, bool)):
            return node.value
        raise ExprError(f"{type(node.value).__name__} literals are not allowed in an expression", node.col_offset)

    def visit_Name(self, node: ast.Name):
        if node.id in self.names:
            return self.names[node.id]
        if node.id in ("true", "false", "True", "False"):
            return node.id in ("true", "True")
        raise ExprError(
            f"unknown name '{node.id}'",
            node.col_offset,
            hint=did_you_mean(node.id, self.names) or ("names here: " + ", ".join(sorted(self.names)) if self.names else None),
        )

    def visit_BinOp(self, node: ast.BinOp):
        op = _BINARY.get(type(node.op))
        if op is None:
            raise ExprError(f"the operator {type(node.op).__name__} is not allowed", node.col_offset)
        left, right = self.visit(node.left), self.visit(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ExprError("division by zero", node.right.col_offset, hint=f"the divisor `{ast.unparse(node.right)}` is 0 here")
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ExprError(f"exponent {right} is too large", node.right.col_offset)
        return op(left, right)

    def visit_UnaryOp(self, node: ast.UnaryOp):
        value = self.visit(node.operand)
        if isinstance(node.op, ast.USub):
            return -value
        if isinstance(node.op, ast.UAdd):
            return +value
        if isinstance(node.op, ast.Not):
            return not value
        raise ExprError("the operator ~ is not allowed", node.col_offset)

    def visit_Compare(self, node: ast.Compare):
        left = self.visit(node.left)
        for op, right_node in zip(node.ops, node.comparators):
            fn = _COMPARE.get(type(op))
            if fn is None:
                raise ExprError(f"the comparison {type(op).__name__} is not allowed", node.col_offset)
            right = self.visit(right_node)
            if not fn(left, right):
                return False
            left = right
        return True

    def visit_BoolOp(self, node: ast.BoolOp):
        is_and = isinstance(node.op, ast.And)
        value = None
        for v in node.values:
            value = self.visit(v)
            if bool(value) != is_and:
                return value
        return value

    def visit_IfExp(self, node: ast.IfExp):
        return self.visit(node.body) if self.visit(node.test) else self.visit(node.orelse)

    def visit_Call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise ExprError(f"'{name}' cannot be called in an expression", node.col_offset,
                            hint=did_you_mean(name, FUNCTIONS) or "the functions are min, max and abs")
        if node.keywords:
            raise ExprError("keyword arguments are not allowed", node.keywords[0].col_offset if hasattr(node.keywords[0], "col_offset") else node.col_offset)
        args = [self.visit(a) for a in node.args]
        if not args or (node.func.id == "abs" and len(args) != 1):
            raise ExprError(f"wrong number of arguments to {node.func.id}", node.col_offset)
        return FUNCTIONS[node.func.id](*args)


def _describe(node: ast.AST) -> str:
    kinds = {
        "Attribute": "attribute access",
        "Subscript": "indexing",
        "Lambda": "a lambda",
        "ListComp": "a comprehension",
        "List": "a list",
        "Dict": "a dict",
        "Tuple": "a tuple",
        "JoinedStr": "an f-string",
    }
    return kinds.get(type(node).__name__, type(node).__name__)
