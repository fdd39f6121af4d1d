"""mkdocs hooks for the API reference: every documented name has a docstring, and the errors table is generated.

``mkdocs build --strict`` fails on any warning; mkdocstrings alone renders a missing docstring as an empty
entry. So each page's ``::: dotted.name`` directive is checked here: the object and every member it shows
(its ``members`` option, else its public names) must have a docstring, or the build warns and fails.
``<!-- errors-table -->`` becomes a table of ``routing.errors``: each class, its parent, its fields and its
message (the class docstring, else its message template), so a new error is documented when it is added.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import textwrap
from typing import Any

import yaml

log = logging.getLogger("mkdocs.hooks.api_reference")

#: A Sphinx cross-reference role as mkdocstrings renders it: ``:class:<code>~a.b.C</code>``.
SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc):<code>(~?)([\w.]+)</code>")
DIRECTIVE = re.compile(r"^::: (?P<name>[\w.]+)\n(?P<options>(?:[ \t]+.*\n?)*)", re.M)


def _resolve(dotted: str) -> Any:
    """``routing.Client`` or ``routing.producer.handles.ModuleRef``: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _doc_of(owner: type, name: str) -> str | None:
    """The docstring of ``owner.name`` as written in the class (or a base of it) that defines it."""
    for klass in owner.__mro__:
        if klass is object or name not in vars(klass):
            continue
        member = vars(klass)[name]
        target = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        doc = getattr(target, "__doc__", None)
        return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None
    return None


def _public(klass: type, inherited: bool) -> list[str]:
    """Public methods and properties mkdocstrings shows for ``klass`` (its own, or from project bases too)."""
    owners = [k for k in klass.__mro__ if k.__module__.startswith("routing")] if inherited else [klass]
    names: dict[str, None] = {}
    for owner in owners:
        for name, member in vars(owner).items():
            if not name.startswith("_") and (callable(member) or isinstance(member, (property, classmethod))):
                names[name] = None
    return list(names)


def undocumented(dotted: str, options: dict[str, Any]) -> list[str]:
    """The names ``::: dotted`` would show without a docstring."""
    obj = _resolve(dotted)
    missing = [] if inspect.getdoc(obj) else [dotted]
    if inspect.isclass(obj):
        members = options.get("members") or _public(obj, bool(options.get("inherited_members")))
        missing += [f"{dotted}.{name}" for name in members if not _doc_of(obj, name)]
    return missing


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    for match in DIRECTIVE.finditer(markdown):
        options = yaml.safe_load(textwrap.dedent(match["options"])) or {}
        for name in undocumented(match["name"], options.get("options") or {}):
            log.warning("%s: %s has no docstring (the API reference would show it empty)", page.file.src_path, name)
    return markdown.replace("<!-- errors-table -->", errors_table())


def on_page_content(html: str, **_: Any) -> str:
    """Docstrings are written for Sphinx and pydoc alike: show ``:class:`~a.b.C``` as the code name ``C``."""
    return SPHINX_ROLE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", html)


def errors_table() -> str:
    """Every class of ``routing.errors`` as a markdown table, in the module's order."""
    errors = importlib.import_module("routing.errors")
    rows = ["| error | is a | fields | what it means |", "| --- | --- | --- | --- |"]
    for name, klass in vars(errors).items():
        if not (inspect.isclass(klass) and issubclass(klass, BaseException) and klass.__module__ == errors.__name__):
            continue
        meaning = str(klass.__doc__ or getattr(klass, "template", "") or "")
        if not meaning:
            log.warning("routing.errors.%s has neither a docstring nor a message template", name)
        fields = ", ".join(f"`{field}`" for field in getattr(klass, "fields", ()))
        text = " ".join(inspect.cleandoc(meaning).split()).replace("|", "\\|")
        rows.append(f"| `{name}` | `{klass.__bases__[0].__name__}` | {fields} | {text} |")
    return "\n".join(rows)
