"""Rewrite README.md's configuration reference from the config models.

Run ``python tests/helpers/readme_reference.py`` after changing a setting; a test checks that the
README holds exactly what ``reference_markdown()`` generates. The generated part runs from the
first ``**`section:`**`` line of "## Configuration" to the next "## " heading.
"""

from __future__ import annotations

import sys
from pathlib import Path

from streamer.app.config import reference_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def rewrite(text: str) -> str:
    head, sep, rest = text.partition("\n## Configuration\n")
    if not sep:
        raise SystemExit("README.md has no '## Configuration' section")
    start = rest.index("\n**`") + 1
    end = rest.index("\n## ", start) + 1
    return head + sep + rest[:start] + reference_markdown() + "\n" + rest[end:]


if __name__ == "__main__":
    new = rewrite(README.read_text())
    changed = new != README.read_text()
    README.write_text(new)
    print("README.md configuration reference " + ("rewritten" if changed else "already current"))
    sys.exit(0)
