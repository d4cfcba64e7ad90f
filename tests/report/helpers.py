"""Reading a report back: its sections, tables and references."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

SECTION = re.compile(r'<section id="([^"]+)">(.*?)</section>', re.S)


def sections(html: str) -> dict[str, str]:
    """Section id -> the section's markup."""
    return {m.group(1): m.group(2) for m in SECTION.finditer(html)}


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self._table = dict(attrs).get("class") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._table is not None and self._row is not None:
            if self._row:
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> _Collector:
    collector = _Collector()
    collector.feed(html)
    return collector


def table(html: str, cls: str) -> list[list[str]]:
    """The body rows of the table of class ``cls`` (cell texts, unescaped)."""
    return parse(html).tables[cls]


def external_references(html: str) -> list[str]:
    """Every src/href/xlink:href (and CSS url()) that points outside the document."""
    found = []
    for _, attrs in parse(html).tags:
        for name, value in attrs.items():
            if name in ("src", "href", "xlink:href", "action", "poster", "data") and value \
                    and not value.startswith(("#", "data:")):
                found.append(f"{name}={value}")
    found += re.findall(r"url\(\s*['\"]?(?!#|data:)[^)]*\)", html)
    found += re.findall(r"@import[^;]*;", html)
    return found


def append_line(path: Path, record: object | str, newline: bool = True) -> None:
    text = record if isinstance(record, str) else json.dumps(record)
    with path.open("a", encoding="utf-8") as f:
        f.write(text + ("\n" if newline else ""))
