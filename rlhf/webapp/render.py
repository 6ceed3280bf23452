"""HTML out of templates and markdown, with everything from outside (model outputs, prompts, names, guidelines)
escaped: Jinja2 autoescapes every `{{ value }}`, and markdown is rendered with raw HTML turned off."""

from __future__ import annotations

from pathlib import Path

import jinja2
from markupsafe import Markup

HERE = Path(__file__).parent


def environment() -> jinja2.Environment:
    # autoescape=True for every template (not only *.html): one rule, no exceptions
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )


def markdown_to_html(text: str) -> Markup:
    """CommonMark (plus tables) with raw HTML shown as text; markdown-it drops javascript:, vbscript:, file: and
    data: links (validateLink), so the guidelines cannot carry script even if the file is hostile."""
    from markdown_it import MarkdownIt

    return Markup(MarkdownIt("commonmark", {"html": False}).enable("table").render(text))


def read_guidelines(path: str | None) -> Markup | None:
    return markdown_to_html(Path(path).read_text(encoding="utf-8")) if path else None
