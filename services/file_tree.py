"""Turn flat file paths into a tree for the file browser, and highlight file contents."""

from __future__ import annotations

from dataclasses import dataclass, field

from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, guess_lexer_for_filename
from pygments.util import ClassNotFound


@dataclass
class Node:
    name: str
    file_id: int | None = None
    size: int = 0
    children: dict[str, Node] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return self.file_id is None

    def sorted_children(self) -> list[Node]:
        return sorted(self.children.values(), key=lambda n: (not n.is_dir, n.name.lower()))


def build_tree(files) -> Node:
    root = Node("")
    for file in files:
        node = root
        parts = file.path.split("/")
        for part in parts[:-1]:
            node = node.children.setdefault(part, Node(part))
        node.children[parts[-1]] = Node(parts[-1], file_id=file.id, size=file.file_size)
    return root


def highlighted(path: str, content: str) -> Markup:
    try:
        lexer = guess_lexer_for_filename(path, content)
    except ClassNotFound:
        lexer = TextLexer()
    formatter = HtmlFormatter(cssclass="hl", linenos="table")
    # Pygments escapes the source text itself; the result is safe markup.
    return Markup(highlight(content, lexer, formatter))
