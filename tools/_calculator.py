"""`calculator`: arithmetic on an expression string, evaluated from Python's AST (never `eval`).

Only numbers, + - * / // % **, unary signs, parentheses and a few math functions are accepted;
exponents and intermediate sizes are bounded so an expression cannot exhaust memory or time.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Annotated

from pydantic import Field

from agentrt.tools._tool import tool

__all__ = ["calculator", "evaluate"]

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {
    "sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
    "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "floor": math.floor, "ceil": math.ceil,
}
_CONSTS = {"pi": math.pi, "e": math.e}
_MAX_EXPONENT = 1000
_MAX_DIGITS = 4000


def _check(x: float | int) -> float | int:
    if isinstance(x, int) and x.bit_length() > _MAX_DIGITS * 3.33:
        raise ValueError("number too large")
    return x


def _eval(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        return _UNOPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} too large (max {_MAX_EXPONENT})")
        return _check(_BINOPS[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords):
        return _check(_FUNCS[node.func.id](*(_eval(a) for a in node.args)))
    raise ValueError(f"unsupported expression element: {ast.unparse(node) if isinstance(node, ast.expr) else node}")


def evaluate(expression: str) -> float | int:
    """Evaluate an arithmetic expression safely; raises ValueError / ZeroDivisionError on bad input."""
    expr = expression.replace("^", "**").replace("×", "*").replace("÷", "/").strip()
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from e
    return _eval(tree)


@tool
def calculator(expression: Annotated[str, Field(min_length=1, max_length=500)]) -> float | int:
    """Evaluate an arithmetic expression and return the number.

    Args:
        expression: arithmetic such as "(2 + 3) * 4 / 7" or "sqrt(2) ** 3"; supports + - * / // % **,
            parentheses, pi, e and sqrt, abs, round, min, max, log, log10, exp, sin, cos, tan, floor, ceil.
    """
    return evaluate(expression)
