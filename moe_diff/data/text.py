"""Text sources read as UTF-8: invalid bytes become U+FFFD, are counted per file, and refused above a small share."""

from __future__ import annotations

import re
from pathlib import Path

from moe_diff.errors import DataError

MAX_INVALID_SHARE = 0.01  # a stray byte is noise; more is another encoding, or not text at all
NAMED_IN_NOTE = 5  # files named in the note; the rest are counted
_ESCAPED = re.compile("[\udc80-\udcff]")  # surrogateescape's stand-ins, one per undecodable byte


def invalid_bytes(path: Path) -> int:
    """How many of the file's bytes are not valid UTF-8."""
    with path.open("rb") as file:
        return sum(len(_ESCAPED.findall(line.decode("utf-8", errors="surrogateescape"))) for line in file)


class Utf8Check:
    """Measures text files whose reading produced U+FFFD: refuses one above MAX_INVALID_SHARE (or, where a directory
    or glob turned it up, leaves it out), and notes the others."""

    def __init__(self) -> None:
        self.flawed: list[tuple[Path, int, int]] = []  # (file, invalid bytes, bytes): read, with U+FFFD
        self.left_out: list[tuple[Path, int, int]] = []  # not text: turned up by a directory or glob

    def admit(self, path: Path, named: bool = True) -> bool:
        """Whether to read the file, from its share of invalid bytes (a U+FFFD written on purpose counts for
        nothing); above the limit, a DataError for a file the sources name, else False."""
        invalid, size = invalid_bytes(path), path.stat().st_size
        if invalid > MAX_INVALID_SHARE * size:
            if named:
                raise DataError(f"{path} is not UTF-8 text: {invalid / size:.2%} of its {size:,} bytes are not "
                                f"valid UTF-8, more than the {MAX_INVALID_SHARE:.0%} allowed; convert it to UTF-8 "
                                "(iconv -f ENCODING -t UTF-8) or leave it out of the sources")
            self.left_out.append((path, invalid, size))
            return False
        if invalid:
            self.flawed.append((path, invalid, size))
        return True

    def notes(self) -> list[str]:
        """What the sources' readers should hear: the files left out, and those read with invalid bytes."""
        notes = []
        if self.left_out:
            notes.append(f"left out {_files(self.left_out)}: not UTF-8 text (more than {MAX_INVALID_SHARE:.0%} of "
                         "their bytes invalid), found in a data.source directory or glob")
        if self.flawed:
            notes.append(f"bytes that are not valid UTF-8 were read as U+FFFD in {_files(self.flawed)}; a file "
                         f"with more than {MAX_INVALID_SHARE:.0%} of them is refused")
        return notes


def _files(measured: list[tuple[Path, int, int]]) -> str:
    """The first NAMED_IN_NOTE files with their invalid bytes, then how many more."""
    named = [f"{path} ({invalid:,} of {size:,} bytes, {invalid / size:.2%})"
             for path, invalid, size in measured[:NAMED_IN_NOTE]]
    rest = len(measured) - len(named)
    items = named + ([f"{rest:,} more file{'s' * (rest > 1)}"] if rest else [])
    return f"{', '.join(items[:-1])} and {items[-1]}" if len(items) > 1 else items[0]
