"""MkDocs hook: the site's home page is README.md, so that the two never drift apart.

The README is written for GitHub (and its front matter configures a Hugging Face Space): here the front
matter is dropped and its links into ``docs/`` are made relative to the site.
"""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_as_home(text: str) -> str:
    """The README's markdown as the site's index page."""
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)
    return re.sub(r"\]\(docs/", "](", text)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs' hook: replace index.md's placeholder with the README."""
    if page.file.src_uri == "index.md":
        return readme_as_home(README.read_text(encoding="utf-8"))
    return markdown
