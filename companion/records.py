"""Recorded runs: experiments too slow for a notebook, written once as JSON assets.

Some of the book's comparisons train for minutes -- a learning-rate grid, then three
seeds at the best rate (chapter 4's block comparison, chapter 6's induction heads,
chapter 10's runs from scratch, chapter 13's adversarial training). A notebook has
seconds, so each module records such runs once, with ``python -m companion.<module>
--record NAME``, into ``companion/assets/``. A *record* is one JSON object::

    {"what": <what was run, and by which function>, "torch": <PyTorch version>,
     "settings": <every setting the runs depend on>, **fields}   # e.g. "runs": [...]

A record is trusted only as far as it is checked, in two ways:

1. :func:`load_record` refuses a record whose ``settings`` are not the settings the
   package uses now, and names the command that re-records it -- a changed constant
   never meets an old recording silently;
2. the notebook re-computes a cheap prefix of the recording (seed 0's first steps, say)
   and compares it with the record: the recording is what today's code computes, not
   only what some earlier code computed.

:func:`record_main` is every module's ``--record`` command line.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import torch

from companion._validate import check_callable, check_type

__all__ = ["write_record", "load_record", "check_settings", "record_main", "JOBS_OPTION"]

#: ``record_main(..., options={"--jobs": JOBS_OPTION})``: how many runs at a time.
JOBS_OPTION = {"type": int, "default": 1, "help": "runs in parallel (one CPU thread each)"}


def _as_json(value):
    """``value`` after a JSON round trip (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def write_record(path: str | Path, what: str, settings: dict, *, indent: int | None = None,
                 **fields) -> dict:
    """Write ``{"what", "torch", "settings", **fields}`` to ``path`` as JSON (compact on
    one line, or with ``indent``) and return that dict."""
    check_type("path", path, (str, Path))
    check_type("what", what, str)
    check_type("settings", settings, dict)
    record = {"what": what, "torch": torch.__version__, "settings": settings, **fields}
    text = json.dumps(record, separators=(",", ":")) if indent is None else \
        json.dumps(record, indent=indent)
    Path(path).write_text(text + "\n", encoding="utf-8")
    return record


def check_settings(where: str | Path, recorded, settings: dict, command: str) -> None:
    """Raise ``ValueError`` unless ``recorded`` equals ``settings`` after a JSON round
    trip; the message names ``where`` the record lies and the ``command`` that re-records it."""
    check_type("settings", settings, dict)
    check_type("command", command, str)
    expected = _as_json(settings)
    if recorded != expected:
        raise ValueError(f"{where} was recorded with settings {recorded}, not {expected}: "
                         f"re-record it with {command}")


def load_record(path: str | Path, settings: dict, command: str) -> dict:
    """The JSON record at ``path``; ``ValueError`` (naming ``command``, which re-records
    it) if its ``"settings"`` are not ``settings``."""
    check_type("path", path, (str, Path))
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    check_type("record", record, dict)
    check_settings(path, record.get("settings"), settings, command)
    return record


def _parser(prog: str, names: list[str], description: str | None,
            options: dict[str, dict]) -> argparse.ArgumentParser:
    """``--record NAME`` (the name may be left out when there is one), ``--out PATH`` and
    ``options`` (``{flag: add_argument keywords}``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    one = len(names) == 1
    parser.add_argument("--record", choices=names, nargs="?" if one else None,
                        const=names[0] if one else None, metavar="NAME",
                        help=f"which runs to record: {', '.join(names)}")
    parser.add_argument("--out", default=None, metavar="PATH", help="where to write the "
                        "JSON record (default: the asset the book reads)")
    for flag, keywords in options.items():
        parser.add_argument(flag, **keywords)
    return parser


def record_main(prog: str, recorders: dict[str, Callable[..., object]],
                argv: list[str] | None = None, *, description: str | None = None,
                options: dict[str, dict] | None = None, threads: int | None = None) -> int:
    """The command line ``prog --record NAME [--out PATH] [options]``: calls
    ``recorders[NAME](path=PATH, log=print, **options)`` -- ``path`` only with ``--out``,
    ``log`` (printing with flush) only if the recorder takes it, each option by its
    ``dest``. ``threads`` sets PyTorch's CPU threads first. Returns 0."""
    check_type("prog", prog, str)
    check_type("recorders", recorders, dict)
    if not recorders:
        raise ValueError("recorders must name at least one recorder, got {}")
    for name, recorder in recorders.items():
        check_callable(f"recorders[{name!r}]", recorder)
    options = {} if options is None else options
    check_type("options", options, dict)
    parser = _parser(prog, list(recorders), description, options)
    args = vars(parser.parse_args(argv))
    name, out = args.pop("record"), args.pop("out")
    if name is None:
        parser.error("nothing to do: pass --record")
    recorder = recorders[name]
    if out is not None:
        args["path"] = out
    if "log" in inspect.signature(recorder).parameters:
        args["log"] = functools.partial(print, flush=True)
    if threads is not None:
        torch.set_num_threads(threads)
    recorder(**args)
    return 0
