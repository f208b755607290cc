"""The committed compatibility matrix (docs/compat_matrix.md and .json) is what qadapter_utils.compat measures now."""
import json

import pytest

from qadapter_utils import compat


@pytest.fixture(scope="module")
def measured():
    return compat.compute()


def test_matrix_matches_the_committed_table(measured):
    committed = json.loads((compat.DOCS / "compat_matrix.json").read_text())
    assert compat.statuses(measured) == compat.statuses(committed), \
        "the compatibility matrix changed: regenerate it with `python -m qadapter_utils.compat` and commit docs/"
    assert compat.to_markdown(measured) == (compat.DOCS / "compat_matrix.md").read_text()


def test_matrix_covers_every_cell_and_records_losses(measured):
    cells = measured["cells"]
    assert set(cells) == set(compat.ARCHITECTURES)
    for by_precision in cells.values():
        assert set(by_precision) == set(compat.PRECISIONS)
        for row in by_precision.values():
            assert list(row) == compat.METHODS
            for method, cell in row.items():
                assert cell["status"] in ("ok", "error", "fails")
                if cell["status"] == "ok":
                    losses = cell["losses"]
                    assert len(losses) == compat.STEPS and all(b < a for a, b in zip(losses, losses[1:])), method


def test_known_results(measured):
    """What we rely on in the notebooks: QLoRA works everywhere; our clear errors fire where adapters fails."""
    cells = measured["cells"]
    for arch in compat.ARCHITECTURES:
        for precision in compat.PRECISIONS:
            for method in ("lora", "prefix", "seq_bn", "par_bn", "ia3"):
                assert cells[arch][precision][method]["status"] == "ok", (arch, precision, method)
            assert cells[arch][precision]["prompt_tuning"]["status"] == "error"
        assert cells[arch]["unquantized"]["dora"]["status"] == "ok"
        assert cells[arch]["4-bit NF4"]["dora"]["status"] == "error"
    assert cells["Mistral (GQA)"]["4-bit NF4"]["vera"]["status"] == "error"
    assert cells["Llama"]["4-bit NF4"]["vera"]["status"] == "ok"
