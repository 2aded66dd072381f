"""Command-line plumbing shared by every entrypoint: ``--help`` that lists the options, and user errors
as one line.

``run(main, describe)`` is ``fire.Fire(main)`` plus two rules:

* ``-h`` / ``--help`` anywhere print ``describe()`` (each option with its type, default and one-line
  description) and exit 0;
* a ``--flag`` that ``main`` has no parameter for (when it takes no ``**options``) is refused before any
  work: one line with what it may mean, exit 2;
* a user error (a bad value, a missing file, an inconsistent config: ``ValueError``, ``OSError``
  subclasses and ``CheckpointError`` raised by this repository's code) prints ``error: <message>``
  on rank 0 and exits 2. ``DTM_TRACEBACK=1`` shows the traceback instead. Errors raised inside a
  library (bugs, ours or theirs) keep their traceback.
"""

import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path

from dtm_ds.files import ROOT, FolderInUse

__all__ = ["USER_ERRORS", "dataclass_rows", "describe", "describe_config", "function_rows", "run"]

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FolderInUse)


def run(main: Callable, describe: Callable[[], str], exit_at_once: bool = False) -> None:
    """``exit_at_once``: after ``main`` returns (its files written and closed), end the process without the
    interpreter's teardown. Distributed entrypoints use it: a communication library's threads still
    alive at teardown can abort a finished rank ("terminate called without an active exception", seen
    here on 2-rank CPU runs), turning a clean run into a failed job."""
    import fire

    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(describe())
        sys.exit(0)
    unknown = unknown_flags(main, sys.argv[1:])
    if unknown:  # before any work: fire would apply a flag it cannot consume to main's result, afterwards
        print(f"error: {unknown}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        fire.Fire(main, serialize=lambda result: None)
    except Exception as err:
        if os.environ.get("DTM_TRACEBACK") or not _is_user_error(err):
            raise
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1  # every rank says its own error, naming itself
        print(f"error (rank {os.environ.get('RANK', '0')}): {err}" if multi else f"error: {err}", file=sys.stderr,
              flush=True)  # fmt: skip
        sys.exit(2)
    if exit_at_once:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def unknown_flags(main: Callable, argv: list[str]) -> str | None:
    """For a ``main`` without ``**options``: what is wrong with the ``--flags`` of ``argv`` that it has no
    parameter for (one line, each with what it may mean), or None."""
    from dtm_ds.options import suggest

    params = inspect.signature(main).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None  # its options are checked by main itself (parse_options)
    names = {n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL}
    given = [a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")]
    bad = [g for g in given if g not in names and not (g.startswith("no") and g[2:] in names)]
    if not bad:
        return None
    hints = "".join(f"; --{b}: did you mean --{close[0]}?" for b in bad if (close := suggest(b, sorted(names))))
    return f"unknown options {['--' + b for b in bad]}{hints} (--help lists them)"


def _is_user_error(err: BaseException) -> bool:
    """A user error: raised by this repository's own code (not a library's), of a user-error type."""
    from dtm_ds.checkpoint import CheckpointError

    if not isinstance(err, (*USER_ERRORS, CheckpointError)):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    origin = Path(frames[-1].filename).resolve() if frames else ROOT
    return ROOT in origin.parents and ".venv" not in origin.parts


def _field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal that follows it)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def dataclass_rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(flag, type, default, doc) of every field of ``cls``."""
    docs, rows = _field_docs(cls), []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        rows.append((f"--{prefix}{f.name}", _type_name(f.type), default, docs.get(f.name, "")))
    return rows


def function_rows(fn: Callable, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """(flag, type, default, doc) of every named parameter of ``fn``, described by its docstring's
    ``Args:`` section."""
    docs, rows = _arg_docs(fn), []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or name in skip:
            continue
        default = "required" if p.default is p.empty else repr(p.default)
        rows.append((f"--{name}", _type_name(p.annotation), default, docs.get(name, "")))
    return rows


def _arg_docs(fn: Callable) -> dict[str, str]:
    """``{name: description}`` from a Google-style ``Args:`` section (continuation lines indented deeper)."""
    lines, docs, name, inside = inspect.getdoc(fn).splitlines(), {}, None, False
    for line in lines:
        if line.strip() == "Args:":
            inside = True
        elif inside and line.startswith("    ") and not line.startswith("     ") and ":" in line:
            name, text = line.strip().split(":", 1)
            docs[name] = text.strip()
        elif inside and line.startswith("     ") and name:
            docs[name] += " " + line.strip()
        elif inside and line.strip():
            inside = False
    return docs


def describe_config(usage: str, main: Callable) -> str:
    """``--help`` of an entrypoint whose options are ``main``'s and every pretraining config field."""
    from dtm_ds.config import SECTIONS

    sections = [("Options", function_rows(main, skip=("local_rank",)))]
    for name, kind in SECTIONS.items():
        title = f"{name} (--{name}.<field>=value; defaults before the preset)"
        sections.append((title, dataclass_rows(kind, f"{name}.")))
    return describe(usage, sections)


def describe(usage: str, sections: list[tuple[str, list[tuple[str, str, str, str]]]]) -> str:
    """The help text: usage, then one table per section."""
    out = [usage.strip(), ""]
    for title, rows in sections:
        out.append(f"{title}:")
        width = max(len(flag) for flag, *_ in rows) + 2
        for flag, kind, default, doc in rows:
            out.append(f"  {flag:<{width}}{kind} = {default}")
            if doc:
                indent = " " * (width + 4)
                out.extend(textwrap.wrap(doc, 100, initial_indent=indent, subsequent_indent=indent))
        out.append("")
    out.append("Errors print one 'error: ...' line and exit 2; DTM_TRACEBACK=1 shows the traceback.")
    return "\n".join(out)


def _type_name(annotation) -> str:
    if annotation is inspect.Parameter.empty:
        return "any"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
