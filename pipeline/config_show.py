"""`streamssl config --show`: every key a job reads, one per line, with its default and one line of help."""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import yaml

from streamssl.pipeline.config import Job, applies, reference
from streamssl.pipeline.sections import MethodOptions


def field_help(cls: type) -> dict[str, str]:
    """A dataclass field's help: its trailing comment, else the comment lines right above it; for a method's
    section, the option's line in the method's docstring (`name: text`)."""
    if issubclass(cls, MethodOptions):
        return _docstring_options(inspect.getdoc(cls.method) or "")
    helps: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"(\w+): [^=]+=.*?(?:  # (.*))?$", stripped)
        if match:
            helps[match[1]] = match[2] or " ".join(above)
        above = []
    return helps


def _docstring_options(doc: str) -> dict[str, str]:
    """`name: text` (or `a, b: text`) entries of a docstring, with their more deeply indented continuation lines."""
    found: dict[str, str] = {}
    names: list[str] = []
    indent = 0
    for line in doc.splitlines():
        depth = len(line) - len(line.lstrip())
        match = re.match(r"\s*(\w+(?:, \w+)*): (.+)$", line)
        if names and line.strip() and depth > indent:
            for name in names:
                found[name] += " " + line.strip()
        elif match:
            names, indent = match[1].split(", "), depth
            found.update(dict.fromkeys(names, match[2].strip()))
        else:
            names = []
    return found


def describe(method: str, job: Job) -> list[str]:
    """`key = default  # help` for every key that `job` running `method` reads, with their defaults."""
    cfg = reference(method, job)
    lines = []

    def walk(node: Any, prefix: str) -> None:
        helps = field_help(type(node))
        for f in dataclasses.fields(node):
            value, key = getattr(node, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif applies(key, job, method):
                lines.append(f"{key} = {json_value(value)}  # {helps.get(f.name, '')}".rstrip(" #"))

    walk(cfg, "")
    return lines


def json_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
