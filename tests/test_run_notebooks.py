"""scripts/run_notebooks.py, the GPU notebook runner, driven through its own code path on the CPU: notebook 00 on
the tiny model in a real Jupyter kernel, and a notebook that fails, to check what the runner records."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "scripts" / "run_notebooks.py"


def test_runner_executes_notebook_00_and_writes_the_table(tmp_path):
    env = dict(os.environ, QADAPTER_MODEL="tiny")
    done = subprocess.run([sys.executable, str(RUNNER), "--only", "00", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = json.loads((tmp_path / "results.json").read_text())
    assert [r["notebook"] for r in table["rows"]] == ["00_setup.ipynb"]
    row = table["rows"][0]
    assert row["status"] == "passed" and row["error"] is None and row["seconds"] > 0
    assert table["meta"]["model"] == "tiny" and not table["meta"]["t4"]
    executed = nbformat.read(tmp_path / "00_setup.ipynb", as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code) and any(c.outputs for c in code)
    assert all("execution" not in c.metadata for c in executed.cells), "cleaned like the committed notebooks"
    assert "| 00_setup.ipynb | passed |" in (tmp_path / "results.md").read_text()


def test_runner_records_the_first_error_and_allows_errors_shown_on_purpose(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("# NBVAL_RAISES_EXCEPTION\nraise KeyError('shown on purpose')"),
                nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell("1 / 0"),
                nbformat.v4.new_code_cell("y = 2")]
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    out = tmp_path / "out"
    env = dict(os.environ, QADAPTER_PEAK_FILE=str(tmp_path / "peaks.jsonl"))
    done = subprocess.run([sys.executable, str(RUNNER), "--one", str(path), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads((out / "bad.row.json").read_text())
    assert row["status"] == "failed" and row["error"].startswith("cell 2: ZeroDivisionError")
    executed = nbformat.read(out / "bad.ipynb", as_version=4)
    assert executed.cells[3].execution_count, "the cells after a failure still run, as a learner would see them"
    assert "tags" not in executed.cells[0].metadata, "the runner's own tag is not left in the saved notebook"


def test_t4_stand_in_refuses_a_machine_without_cuda(tmp_path):
    done = subprocess.run([sys.executable, str(RUNNER), "--t4", "--only", "00", "--out", str(tmp_path)],
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "make run" in done.stderr and not (tmp_path / "results.json").exists()


def test_t4_estimate_scales_gpu_notebooks_by_the_measured_rate_and_leaves_cpu_ones():
    sys.path.insert(0, str(RUNNER.parent))
    import run_notebooks

    assert run_notebooks.t4_minutes(60, 650.0, peak_allocated_gib=3.5) == 10.0   # 650 / 65 TFLOP/s: 10x slower
    assert run_notebooks.t4_minutes(60, 650.0, peak_allocated_gib=0) == 1.0      # ran on the CPU: as measured
    assert run_notebooks.t4_minutes(60, None) is None                             # rate not measured (no GPU)


def test_a_notebook_past_its_time_limit_is_killed_with_its_kernel(tmp_path):
    import psutil

    mark = f"qadapter-test-{os.getpid()}-{tmp_path.name}"  # inherited by the runner's child and its kernel
    env = dict(os.environ, QADAPTER_MODEL="tiny", QADAPTER_TEST_MARK=mark)
    done = subprocess.run([sys.executable, str(RUNNER), "--only", "00", "--notebook-timeout", "4",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["status"] == "failed" and "no result within 4 s" in row["error"] and row["seconds"] >= 4
    assert "--notebook-timeout" in (tmp_path / "results.md").read_text()

    def marked(process):
        try:
            return process.environ().get("QADAPTER_TEST_MARK") == mark
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            return False

    assert not [p for p in psutil.process_iter() if marked(p)]  # neither the child nor its kernel is left


def test_runner_names_the_cells_that_raised_the_gpu_peak_without_resetting_it(tmp_path):
    # no GPU here: the notebook fakes CUDA's statistics, so the runner's own path (IPYTHONDIR startup file in the
    # kernel, its records mapped from execution counts to cell indices) runs as on a GPU
    sys.path.insert(0, str(RUNNER.parent))
    import argparse

    import run_notebooks

    peak = "torch.cuda.max_memory_allocated = lambda *a, **k: {} * 2**30"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# a title"),
                nbformat.v4.new_code_cell("x = 0  # before torch is imported: nothing to record"),
                nbformat.v4.new_code_cell("import torch\ntorch.cuda.is_initialized = lambda: True\nresets = []\n"
                                          "torch.cuda.reset_peak_memory_stats = lambda *a, **k: resets.append(1)\n"
                                          + peak.format(3)),
                nbformat.v4.new_markdown_cell("text between"),
                nbformat.v4.new_code_cell(peak.format(1)),
                nbformat.v4.new_code_cell(peak.format(5)),
                nbformat.v4.new_code_cell(peak.format(4)),
                nbformat.v4.new_code_cell("assert not resets, 'the runner reset the statistics the notebook reads'")]
    path = tmp_path / "peaks.ipynb"
    nbformat.write(nb, path)
    args = argparse.Namespace(out=tmp_path / "out", cell_timeout=60, notebook_timeout=120, t4=False)
    args.out.mkdir()
    row = run_notebooks.run_one(path, args, run_notebooks.make_stand_in(), watch_device=False)
    assert row["status"] == "passed", row
    assert row["peak_raised_gib"] == {"2": 3.0, "5": 5.0}
    assert row["peak_cells"] == "2: 3.00 GiB, 5: 5.00 GiB"
