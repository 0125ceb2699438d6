"""The settings table in Markdown, from `config.Settings`, written between two markers.

`make docs` runs `python -m agentloop.settings_doc FILE`; a test checks the file is current.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from agentloop.config import Settings, env_name, flag_name

BEGIN = "<!-- settings:begin (make docs writes this table from config.py) -->"
END = "<!-- settings:end -->"


def settings_table() -> str:
    """One row per setting: flag, environment variable, default, meaning."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(Settings):
        default = f.default if f.default != "" else "(empty)"
        rows.append(
            f"| `{flag_name(f.name)}` | `{env_name(f.name)}` | `{default}` | {f.metadata['help']} |"
        )
    return "\n".join(rows)


def write_table(path: str | Path) -> None:
    """Replace what lies between the markers in `path` with the current table."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    if not rest:
        raise SystemExit(f"{path}: no {BEGIN} marker")
    path.write_text(f"{head}{BEGIN}\n{settings_table()}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m agentloop.settings_doc FILE")
    write_table(sys.argv[1])
