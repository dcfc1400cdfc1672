"""The SQL files (``sql/``, and ``migrations/`` through ``migrate``): read from the package and filled in.
``${name}`` placeholders take identifiers from validated settings, in the SQL only: a ``--`` comment is left as
written."""

from __future__ import annotations

import re
from importlib import resources

from .config import Settings

_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")


def render_sql(text: str, **values: str) -> str:
    """Fill ``${name}`` placeholders (identifiers from validated settings) in the SQL, not in ``--`` comments;
    other ``$`` (``$1``, ``$$``) stay."""
    return "".join(_render_line(line, values) for line in text.splitlines(keepends=True))


def _render_line(line: str, values: dict[str, str]) -> str:
    quoted = False
    for index, char in enumerate(line):
        if char == "'":
            quoted = not quoted
        elif not quoted and line.startswith("--", index):
            return _PLACEHOLDER.sub(lambda match: values[match.group(1)], line[:index]) + line[index:]
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], line)


def load_sql(name: str, settings: Settings) -> str:
    package = resources.files(__package__).joinpath("sql")
    columns = package.joinpath("select_columns.sql").read_text().split("\n", 1)[1].strip()
    return render_sql(package.joinpath(f"{name}.sql").read_text(), table=settings.qualified_table,
                      journal=settings.qualified_journal, layout=settings.qualified_layout, columns=columns)
