"""The project's error base class, how commands report one (a single line on stderr, exit status 2), and user text
made safe to print through rich markup."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.markup import escape


class MoeDiffError(Exception):
    """Something the user gave (a config, a checkpoint, data, an argument) cannot be used; the message says what
    and what is allowed, in one line."""


class UsageError(MoeDiffError, ValueError):
    """An argument of a function or command that is not allowed."""


def run_reporting_errors(command: Callable[[], int]) -> int:
    """The command's exit status; a MoeDiffError, or an OSError (a path that cannot be read or written), is printed
    as one `error: ...` line on stderr instead of a traceback, with status 2."""
    try:
        return command()
    except (MoeDiffError, OSError) as error:
        Console(stderr=True).print(f"[red]error:[/] {literal(error)}", highlight=False, soft_wrap=True)
        return 2


def teller(console: Console) -> Callable[[str], None]:
    """A `tell` callback (what functions use for notes to the user) that prints each note on `console` as it is."""
    return lambda note: console.print(literal(note), highlight=False, soft_wrap=True)


def literal(value: object) -> str:
    """`value` as rich markup that prints it as it is: a path or a message may hold square brackets
    (pip install 'moe-diff[hf]', a directory named [/x]) that rich would otherwise read as tags."""
    return escape(str(value))


class DataError(MoeDiffError, ValueError):
    """Data that cannot be used: a missing path, an empty corpus, a malformed record."""
