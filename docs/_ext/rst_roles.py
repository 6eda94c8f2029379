"""A griffe extension for the API reference: the docstrings' Sphinx markup, read as Markdown.

normlab's docstrings use Sphinx roles (``:class:`~normlab.nn.BatchNorm2d```, ``:func:``,
``:math:``) and ``.. math::`` blocks, which Markdown would show verbatim. Here a role naming a
public ``normlab.`` object becomes a link to its entry (a target missing from the reference
fails the strict build), any other role becomes inline code, and a math block becomes a code
block of its LaTeX.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|data|obj|exc|math):`(~?)([^`]+)`")
_MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>\S.*)?$")


def _role(match: re.Match[str]) -> str:
    kind, short, target = match.groups()
    if kind == "math":
        return f"`{target}`"
    target = target.strip()
    shown = target.split(".")[-1] if short else target
    if kind != "mod" and target.startswith("normlab.") and "._" not in target:
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"


def _math_blocks(text: str) -> str:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        match = _MATH.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, body = match["indent"], [match["inline"]] if match["inline"] else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out += [f"{indent}```text", *(f"{indent}{b}" for b in body if b), f"{indent}```", ""]
    return "\n".join(out)


def markdown(text: str) -> str:
    """``text`` (a docstring) with its Sphinx roles and math blocks as Markdown."""
    return _ROLE.sub(_role, _math_blocks(text))


class RstRoles(griffe.Extension):
    """Rewrite every loaded docstring with :func:`markdown`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
