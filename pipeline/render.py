"""The static run report as Markdown and as one self-contained HTML page.

Model outputs are untrusted text: in HTML every value goes through Jinja's autoescaping (no raw
markup, no script); in Markdown every character that could open markup, a link, an emphasis or a
table cell is replaced by its HTML entity, so completions render literally in any viewer.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

# Characters that open Markdown syntax anywhere in a line (emphasis, code, links, math, table cells).
_MARKDOWN_SPECIAL = {c: f"&#{ord(c)};" for c in "|`*_[]\\~#$"}


@dataclass
class Example:
    """One prompt with its response under each condition; ``verdicts`` maps judge fields to values."""

    instruction: str
    responses: dict[str, dict[str, Any]]  # condition -> {"text": str, "verdicts": {name: value}}


@dataclass
class ReportContent:
    title: str
    run: dict[str, Any]
    headline: dict[str, Any]
    metrics: dict[str, Any]
    seconds: dict[str, float]
    figures: dict[str, Path]  # caption -> PNG file
    examples: dict[str, list[Example]] = field(default_factory=dict)  # prompt set -> examples
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # title -> rows (same keys each)


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def md_text(text: Any) -> str:
    """Untrusted text as inert Markdown, safe inside a table cell (newlines become ``<br>``)."""
    escaped = html.escape(str(text), quote=False)
    escaped = "".join(_MARKDOWN_SPECIAL.get(c, c) for c in escaped)
    return escaped.replace("\r\n", "\n").replace("\n", "<br>")


def md_cell(text: Any) -> str:
    """Trusted text (metric names, numbers) in a table cell: only the cell separator is escaped."""
    return str(text).replace("|", "&#124;")


def _verdicts(verdicts: dict[str, Any]) -> str:
    return ", ".join(f"{name}={fmt(v)}" for name, v in verdicts.items())


def markdown(content: ReportContent, figure_dir: str) -> str:
    """The report as Markdown; figures are referenced as ``figure_dir/<file>`` next to it."""
    lines = [f"# {content.title}", ""]
    lines += [" · ".join(f"**{k}**: {md_cell(fmt(v))}" for k, v in content.run.items()), ""]

    def table(rows: dict[str, Any], header: tuple[str, str]) -> list[str]:
        out = [f"| {header[0]} | {header[1]} |", "|---|---|"]
        return out + [f"| {md_cell(k)} | {md_cell(fmt(v))} |" for k, v in rows.items()] + [""]

    lines += ["## Headline", ""] + table(content.headline, ("metric", "value"))
    for title, rows in content.tables.items():
        if not rows:
            continue
        columns = list(rows[0])
        lines += [f"## {title}", "", "| " + " | ".join(map(md_cell, columns)) + " |", "|---" * len(columns) + "|"]
        lines += ["| " + " | ".join(md_cell(fmt(row[c])) for c in columns) + " |" for row in rows]
        lines.append("")
    lines += ["## Figures", ""]
    for caption, path in content.figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({figure_dir}/{path.name})", ""]
    lines += ["## Example completions", ""]
    for prompt_set, items in content.examples.items():
        lines += [f"### {prompt_set}", ""]
        for number, example in enumerate(items, 1):
            lines += [f"**{number}.** {md_text(example.instruction)}", "",
                      "| condition | verdicts | response |", "|---|---|---|"]
            lines += [f"| {md_cell(c)} | {md_text(_verdicts(r['verdicts']))} | {md_text(r['text'])} |"
                      for c, r in example.responses.items()]
            lines.append("")
    lines += ["## All metrics", ""] + table(content.metrics, ("metric", "value"))
    lines += ["## Wall time per stage (s)", ""] + table(content.seconds, ("stage", "seconds"))
    return "\n".join(lines)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def html_page(content: ReportContent) -> str:
    """The report as one HTML file with the figures embedded (opens anywhere, no network)."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = fmt
    env.filters["data_uri"] = _data_uri
    return env.get_template("report.html.j2").render(c=content)
