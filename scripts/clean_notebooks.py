"""Strip what makes executed notebooks' diffs noisy: per-cell execution timestamps, widget state, the random ids
pandas gives each styled table, object addresses, and the kernel's temporary file names in warnings. Run after
executing a notebook (`make run`, `make refresh-notebooks`):  python scripts/clean_notebooks.py notebooks/*.ipynb"""
import json
import re
import sys

STYLER_ID = re.compile(r"T_([0-9a-f]{5})(?=[_\"' ])")  # pandas Styler: <style>#T_1a2b3_row0_col0, <table id="T_1a2b3">
ADDRESS = re.compile(r" at 0x[0-9a-f]{6,16}")
KERNEL_FILE = re.compile(r"(?:/[\w.-]+)*/ipykernel_\d+/\d+\.py")  # a warning's "file": the cell, in a temp folder


def _stable(text: str, ids: dict) -> str:
    text = STYLER_ID.sub(lambda m: "T_" + ids.setdefault(m.group(1), f"{len(ids):05d}"), text)
    return KERNEL_FILE.sub("<cell>", ADDRESS.sub(" at 0x0", text))


def clean(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    ids: dict = {}  # Styler id -> a number in order of appearance, the same on every run
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = _stable("".join(out["text"]), ids).splitlines(keepends=True)
            for key, value in out.get("data", {}).items():
                if key.startswith("text/"):
                    out["data"][key] = _stable("".join(value), ids).splitlines(keepends=True)
    nb.get("metadata", {}).pop("widgets", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        clean(p)
