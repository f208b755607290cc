"""Cheap, strict checks on the committed notebooks (nbval executes them; this checks what GitHub shows)."""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
GPU_COPIES = sorted((ROOT / "notebooks" / "gpu-t4").glob("[0-9][0-9]_*.ipynb"))  # executed on a GPU, committed
sys.path.insert(0, str(ROOT / "scripts"))
import colab_links  # noqa: E402

OWNER, NAME = colab_links.repository()
SECRET = re.compile(r"hf_[A-Za-z0-9]{20,}")
MACHINE_PATH = re.compile(r"(/work/|/root/|/home/\w+/|/tmp/[\w.-]+/)")


def _load(path):
    return json.loads(path.read_text())


def _outputs_text(cell):
    for out in cell.get("outputs", []):
        if "text" in out:
            yield "".join(out["text"])
        for key, value in out.get("data", {}).items():
            if key.startswith("text/"):
                yield "".join(value)


def test_series_is_complete_and_numbered():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(len(NOTEBOOKS))) and len(NOTEBOOKS) >= 7


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_conventions(path):
    nb = _load(path)
    cells = nb["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and first.startswith("# ")
    badge = f"(https://colab.research.google.com/github/{OWNER}/{NAME}/blob/main/notebooks/{path.name})"
    assert badge in first, f"the Colab badge must open this notebook from pyproject's Repository: {badge}"
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert code[0].startswith("# NBVAL_SKIP") and '"google.colab" in sys.modules' in code[0]
    assert f'pip install -q "qadapter-utils @ git+https://github.com/{OWNER}/{NAME}"' in code[0]
    assert any("env.report()" in c for c in code[:3]), "an environment cell near the top"
    assert "Exercises" in "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert any(c.startswith("# NBVAL_CHECK_OUTPUT") for c in code), "structural results must be checked"


@pytest.mark.parametrize("path", NOTEBOOKS + GPU_COPIES, ids=lambda p: str(p.relative_to(ROOT / "notebooks")))
def test_committed_outputs_are_clean(path):
    nb = _load(path)
    executed = [c for c in nb["cells"] if c["cell_type"] == "code" and not "".join(c["source"]).startswith(
        "# NBVAL_SKIP")]
    assert all(c.get("execution_count") for c in executed), "commit the notebook executed (make run)"
    for cell in nb["cells"]:
        assert "execution" not in cell.get("metadata", {}), "timestamps: run scripts/clean_notebooks.py"
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error" or "NBVAL_RAISES_EXCEPTION" in "".join(cell["source"])
        for text in _outputs_text(cell):
            assert not SECRET.search(text), "a token in the outputs"
            assert not MACHINE_PATH.search(text), f"a machine path in the outputs: {MACHINE_PATH.search(text)[0]}"


def test_every_link_to_the_project_names_the_repository_in_pyproject():
    """The repository's address lives in pyproject.toml alone; `make colab-links` writes it everywhere else."""
    wrong = {p.name: colab_links.foreign_links(p.read_text(), OWNER, NAME) for p in colab_links.files()}
    assert not {k: v for k, v in wrong.items() if v}, (
        f"{ {k: v for k, v in wrong.items() if v} }: run `make colab-links` (scripts/colab_links.py); if one of these "
        f"is another project's repository, add its owner to colab_links.IGNORED first, or it would be rewritten")


def test_colab_links_rewrites_a_fork_and_leaves_other_projects_alone():
    text = ('[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]'
            '(https://colab.research.google.com/github/qadapter/qadapter/blob/main/notebooks/00_setup.ipynb)\n'
            '!pip install -q "qadapter-utils @ git+https://github.com/qadapter/qadapter"\n'
            'os.system("git clone -q https://github.com/qadapter/qadapter.git")\n'
            'https://raw.githubusercontent.com/qadapter/qadapter/main/benchmarks/results/x.json\n'
            'see https://github.com/adapter-hub/adapters and https://github.com/qadapter/qadapter/blob/main/docs')
    fork = colab_links.rewrite(text, "someone", "fork")
    assert colab_links.foreign_links(fork, "someone", "fork") == []
    assert len(colab_links.foreign_links(text, "someone", "fork")) == 5
    assert "colab.research.google.com/github/someone/fork/blob/main/notebooks/00_setup.ipynb" in fork
    assert "git+https://github.com/someone/fork\"" in fork and "github.com/someone/fork.git" in fork
    assert "raw.githubusercontent.com/someone/fork/main" in fork and "github.com/adapter-hub/adapters" in fork
