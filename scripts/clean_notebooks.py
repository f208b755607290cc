"""Strip what makes executed notebooks' diffs noisy: per-cell execution timestamps and widget state.
Run by `make run` after executing each notebook:  python scripts/clean_notebooks.py notebooks/*.ipynb"""
import json
import sys


def clean(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("execution", None)
    nb.get("metadata", {}).pop("widgets", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        clean(p)
