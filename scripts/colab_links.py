"""Point every notebook's Colab badge, install cell and GitHub link at the repository named in pyproject.toml.

The repository's address lives in one place, `[project.urls] Repository` in pyproject.toml. A fork that publishes
its own copy changes that line and runs `make colab-links` (this script); `tests/test_notebooks_hygiene.py` fails
while any notebook or the README still points elsewhere.

    python scripts/colab_links.py            # rewrite notebooks/*.ipynb and README.md in place
    python scripts/colab_links.py --check    # list what points elsewhere; exit 1 if anything does
"""
from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# github.com/OWNER/NAME in its three forms: the page (and git+ / git clone URLs), Colab's, and raw files
LINK = re.compile(r"(colab\.research\.google\.com/github/|raw\.githubusercontent\.com/|(?<![\w.])github\.com/)"
                  r"([\w.-]+)/([\w.-]+?)(?=[/\"'\s)]|\.git\b|$)")
# Owners of other projects' repositories that the notebooks link to: never rewritten. Every other github.com link
# is taken for this project's, so add an owner here before linking to a new project.
IGNORED = {"adapter-hub", "bitsandbytes-foundation", "computationalmodelling", "huggingface", "rasbt", "d2l-ai",
           "fastai", "karpathy", "unslothai", "artidoro", "TimDettmers", "meta-llama", "EleutherAI", "xvyaward"}


def repository() -> tuple[str, str]:
    """(owner, name) of `[project.urls] Repository` in pyproject.toml, a https://github.com/OWNER/NAME address."""
    url = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    match = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)/?", url)
    if not match:
        raise SystemExit(f"pyproject.toml [project.urls] Repository = {url!r}: Colab opens notebooks from GitHub "
                         f"only; use https://github.com/OWNER/NAME")
    return match.group(1), match.group(2)


def files() -> list[Path]:
    return sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")) + [REPO / "README.md"]


def _ours(match: re.Match) -> bool:
    return match.group(2) not in IGNORED


def foreign_links(text: str, owner: str, name: str) -> list[str]:
    """The links to this project in `text` that name another repository than (owner, name)."""
    return [m.group(0) for m in LINK.finditer(text) if _ours(m) and (m.group(2), m.group(3)) != (owner, name)]


def rewrite(text: str, owner: str, name: str) -> str:
    return LINK.sub(lambda m: f"{m.group(1)}{owner}/{name}" if _ours(m) else m.group(0), text)


def main(argv: list[str]) -> int:
    owner, name = repository()
    wrong = {}
    for path in files():
        text = path.read_text()
        if path.suffix == ".ipynb":  # only the cells' text, so outputs and metadata keep their bytes
            nb = json.loads(text)
            found = [link for cell in nb["cells"] for link in foreign_links("".join(cell["source"]), owner, name)]
            if found and "--check" not in argv:
                for cell in nb["cells"]:
                    cell["source"] = rewrite("".join(cell["source"]), owner, name).splitlines(keepends=True)
                path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        else:
            found = foreign_links(text, owner, name)
            if found and "--check" not in argv:
                path.write_text(rewrite(text, owner, name))
        if found:
            wrong[path.name] = found
    for file, links in wrong.items():
        print(f"{file}: {', '.join(sorted(set(links)))} -> github.com/{owner}/{name}")
    return 1 if wrong and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
