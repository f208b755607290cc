"""Execute the notebook series through a Jupyter kernel, as a learner's Jupyter or Colab would, and record for each
notebook whether it passed (or its first error), its wall time and its peak GPU memory.

    python scripts/run_notebooks.py --out build/gpu-notebooks            # every notebook, this machine as it is
    python scripts/run_notebooks.py --t4 --out build/gpu-notebooks       # a free Colab T4 stood in on a bigger GPU
    python scripts/run_notebooks.py --only 00 04 --out DIR               # some notebooks

`make gpu-notebooks` runs the second line with QADAPTER_MODEL=random:llama2-7b (Llama-2-7B's shape with random
weights: no download, same memory and speed). Set QADAPTER_MODEL to a hub id to run real weights.

--t4 (a stand-in for the GPU most learners have): inside the kernel and every process it starts, PyTorch's
device reports a T4's 14.75 GiB (`torch.cuda.get_device_properties(...).total_memory`, `torch.cuda.mem_get_info()`),
PyTorch's allocator is capped at that less the 0.6 GiB a CUDA context holds on a T4 (14.15 GiB: on the stand-in
the context lives outside the cap, on a T4 inside those 14.75 GiB), and `torch.cuda.is_bf16_supported()` answers
False, so the notebooks take the fp16 path `env.default_compute_dtype()` chooses on a T4. What it cannot stand in
for: a T4's speed (the T4 time is estimated from the measured fp16 matrix rate, see `t4_minutes`) and its missing
flash-attention kernels.

Writes into --out: the executed notebooks (cleaned like the committed ones), `results.json` and `results.md`
(rewritten after every notebook, so a run cut short still leaves its table). Exit status 1 if any notebook failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
T4_TOTAL_GIB = 14.75  # what torch.cuda.get_device_properties(0).total_memory reports on a T4 (memory.GPUS["T4"])
# On a T4 the CUDA context takes its share of those 14.75 GiB; on the stand-in it sits outside the allocator's cap.
# So the cap leaves it out: the project's own figure for it (memory.CUDA_CONTEXT_GIB, also what memory.fits adds).
T4_CONTEXT_GIB = 0.6
T4_FP16_TFLOPS = 65.0  # a T4's dense fp16 tensor-core rate (NVIDIA's datasheet), the divisor of the T4 estimate

# Runs first in every Python process of the kernel's tree (PYTHONPATH reaches them): records the peak of PyTorch's
# allocator for this runner (a notebook that resets the peak statistics does not hide its earlier peak) and, when
# QADAPTER_T4_GIB is set, makes this GPU look and behave like a T4 of that capacity.
SITECUSTOMIZE = textwrap.dedent('''
    import atexit, json, os

    def _qadapter_standin():
        import torch
        if not torch.cuda.is_available():
            return
        cap_gib = float(os.environ.get("QADAPTER_T4_GIB") or 0)  # what the T4 reports as its total memory
        context_gib = float(os.environ.get("QADAPTER_T4_CONTEXT_GIB") or 0)  # the part its CUDA context holds
        peak = {"allocated": 0, "reserved": 0}
        reset = torch.cuda.reset_peak_memory_stats

        def fold():
            peak["allocated"] = max(peak["allocated"], torch.cuda.max_memory_allocated())
            peak["reserved"] = max(peak["reserved"], torch.cuda.max_memory_reserved())

        def reset_peak_memory_stats(device=None):
            fold()
            reset(device)

        torch.cuda.reset_peak_memory_stats = reset_peak_memory_stats

        def high_water():
            fold()
            return peak["allocated"]

        torch.cuda.qadapter_high_water = high_water  # read after every cell (CELL_PEAKS)

        def write():
            fold()
            with open(os.environ["QADAPTER_PEAK_FILE"], "a") as f:
                f.write(json.dumps({"pid": os.getpid(), **peak}) + "\\n")

        if os.environ.get("QADAPTER_PEAK_FILE"):
            atexit.register(write)
        if not cap_gib:
            return
        cap = int(cap_gib * 2**30)
        props = torch.cuda.get_device_properties

        class T4Properties:
            def __init__(self, real):
                self._real = real
                self.total_memory = cap

            def __getattr__(self, name):
                return getattr(self._real, name)

            def __repr__(self):
                return f"{self._real!r} (a T4 stand-in: {cap_gib} GiB, no bf16)"

        torch.cuda.get_device_properties = lambda device=None: T4Properties(props(device))
        usable = cap - int(context_gib * 2**30)  # what PyTorch's allocator can get on a T4
        torch.cuda.mem_get_info = lambda device=None: (max(0, usable - torch.cuda.memory_reserved(device)), cap)
        torch.cuda.is_bf16_supported = lambda including_emulation=True: False
        for device in range(torch.cuda.device_count()):
            torch.cuda.set_per_process_memory_fraction(usable / props(device).total_memory, device)

    if os.environ.get("QADAPTER_T4_GIB") or os.environ.get("QADAPTER_PEAK_FILE"):
        _qadapter_standin()
''')

# Runs in the kernel after every cell (an IPython startup file, found through IPYTHONDIR): appends the peak of
# PyTorch's allocator so far (sitecustomize's high-water mark, which a notebook's own resets of the peak statistics do
# not lower), so that the runner can say which cells raised it. It reads and never resets: the notebook's own
# measurements across cells stay as a learner gets them.
CELL_PEAKS = textwrap.dedent('''
    import json, os, sys

    def _qadapter_cell_peak(result):
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return
        high_water = getattr(torch.cuda, "qadapter_high_water", torch.cuda.max_memory_allocated)
        with open(os.environ["QADAPTER_CELL_PEAK_FILE"], "a") as f:
            f.write(json.dumps({"cell": result.execution_count, "allocated": high_water()}) + "\\n")

    if os.environ.get("QADAPTER_CELL_PEAK_FILE"):
        get_ipython().events.register("post_run_cell", _qadapter_cell_peak)
''')


def notebooks(only: list[str] | None) -> list[Path]:
    """The series in reading order, or those whose number or name starts with one of `only`."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(p.name.startswith(o) for o in only)]
        if not found:
            raise SystemExit(f"--only {' '.join(only)}: no notebook matches; the series is "
                             f"{', '.join(p.name for p in sorted(NOTEBOOKS.glob('[0-9][0-9]_*.ipynb')))}")
    return found


def fp16_tflops() -> float | None:
    """This GPU's dense fp16 matrix rate, measured (8192^3 products), for the T4 estimate; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 10
    for _ in range(n):
        a @ a
    torch.cuda.synchronize()
    rate = 2 * 8192**3 * n / (time.perf_counter() - start) / 1e12
    del a
    torch.cuda.empty_cache()
    return rate


class DeviceMemoryWatch:
    """Samples the GPU's used memory (NVML: every process on the device, CUDA contexts included) while one notebook
    runs; only meaningful when no other notebook runs beside it (inactive otherwise, or without NVML)."""

    def __init__(self, enabled: bool, interval: float = 0.2):
        self.interval, self.peak, self._stop, self._thread, self.active = interval, 0, threading.Event(), None, False
        if not enabled:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle, self._nvml, self.active = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml, True
        except Exception:  # no NVML (a CPU machine, or the package is missing): report nothing rather than guess
            pass

    def _used(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def __enter__(self):
        if self.active:
            self.baseline = self._used()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._used() - self.baseline)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()


def first_error(nb) -> str | None:
    """'cell N: Type: message' for the first error output of a cell not marked to raise, else None."""
    for index, cell in enumerate(nb.cells):
        if "NBVAL_RAISES_EXCEPTION" in cell.source:
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"cell {index}: {out['ename']}: {out['evalue'][:300]}"
    return None


def execute(path: Path, out_dir: Path, cell_timeout: int, watch_device: bool) -> dict:
    """Run one notebook in a fresh kernel (cwd: notebooks/, as Jupyter opens it; the kernel inherits this process's
    environment) and save the executed copy, cleaned like the committed notebooks, into `out_dir`."""
    import nbformat
    from nbclient import NotebookClient

    sys.path.insert(0, str(REPO / "scripts"))
    from clean_notebooks import clean

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # cells that show an error on purpose may raise, as under nbval
        if cell.cell_type == "code" and "NBVAL_RAISES_EXCEPTION" in cell.source:
            cell.metadata.setdefault("tags", []).append("raises-exception")
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    with DeviceMemoryWatch(enabled=watch_device) as watch:
        try:
            client.execute()
            error = first_error(nb)
        except Exception as err:  # a cell timeout or a dead kernel
            error = first_error(nb) or f"{type(err).__name__}: {str(err)[-300:]}"
    seconds = time.perf_counter() - start
    slowest = sorted(((cell_seconds(c), i) for i, c in enumerate(nb.cells) if c.cell_type == "code"), reverse=True)
    for cell in nb.cells:
        if "raises-exception" in cell.metadata.get("tags", []):
            cell.metadata.tags.remove("raises-exception")
            if not cell.metadata.tags:
                del cell.metadata["tags"]
    target = out_dir / path.name
    nbformat.write(nb, target)
    clean(str(target))
    peak_file = Path(os.environ["QADAPTER_PEAK_FILE"])
    peaks = [json.loads(line) for line in peak_file.read_text().splitlines()] if peak_file.exists() else []
    gib = lambda key: round(max(p[key] for p in peaks) / 2**30, 2) if peaks else None  # noqa: E731
    cell_of = {c.execution_count: i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.execution_count}
    cell_file = Path(os.environ.get("QADAPTER_CELL_PEAK_FILE") or os.devnull)
    raised, high = {}, 0  # cell index -> the GPU peak (GiB) it raised the notebook's high-water mark to
    for line in cell_file.read_text().splitlines() if cell_file.exists() else []:
        record = json.loads(line)
        if record["cell"] in cell_of and record["allocated"] > high:
            high = record["allocated"]
            raised[cell_of[record["cell"]]] = round(high / 2**30, 2)
    return {"notebook": path.name, "status": "passed" if error is None else "failed", "error": error,
            "seconds": round(seconds, 1), "peak_allocated_gib": gib("allocated"), "peak_reserved_gib": gib("reserved"),
            "peak_device_gib": round(watch.peak / 2**30, 2) if watch.active else None,
            "slowest_cells": ", ".join(f"{i}: {t:.0f} s" for t, i in slowest[:3] if t >= 1),
            "peak_cells": ", ".join(f"{i}: {g:.2f} GiB" for i, g in list(raised.items())[-3:]),
            "peak_raised_gib": raised,
            "cell_seconds": {i: round(t, 1) for t, i in sorted(slowest, key=lambda x: x[1]) if t >= 0.5}}


def cell_seconds(cell) -> float:
    """How long a cell ran, from the timestamps nbclient records (before clean_notebooks strips them)."""
    from datetime import datetime

    timing = cell.metadata.get("execution", {})
    try:
        begun, ended = timing["iopub.execute_input"], timing["shell.execute_reply"]
    except KeyError:
        return 0.0
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (parse(ended) - parse(begun)).total_seconds()


def unmeasured_row(path: Path, status: str, error: str | None = None) -> dict:
    """The table row of a notebook that produced no measurement (not run, or its child process died)."""
    return {"notebook": path.name, "status": status, "error": error, "seconds": 0, "peak_allocated_gib": None,
            "peak_reserved_gib": None, "peak_device_gib": None}


def make_stand_in() -> Path:
    """A temporary folder that run_one puts on the kernel's PYTHONPATH (sitecustomize.py) and IPYTHONDIR (the cell
    peaks' startup file)."""
    stand_in = Path(tempfile.mkdtemp(prefix="qadapter-runner-"))
    (stand_in / "sitecustomize.py").write_text(SITECUSTOMIZE)
    startup = stand_in / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-cell-peaks.py").write_text(CELL_PEAKS)
    return stand_in


def run_one(path: Path, args, stand_in: Path, watch_device: bool) -> dict:
    """Execute `path` in a child process of its own (its own environment, peak file and kernel) and return its row."""
    env = dict(os.environ, QADAPTER_PEAK_FILE=str(stand_in / f"peaks-{path.stem}.jsonl"),
               QADAPTER_CELL_PEAK_FILE=str(stand_in / f"cell-peaks-{path.stem}.jsonl"),
               IPYTHONDIR=str(stand_in / "ipython"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(stand_in), str(REPO), os.environ.get("PYTHONPATH")])),
               MPLBACKEND="module://matplotlib_inline.backend_inline", TOKENIZERS_PARALLELISM="false",
               PYTHONHASHSEED="0")
    if args.t4:
        env["QADAPTER_T4_GIB"], env["QADAPTER_T4_CONTEXT_GIB"] = str(T4_TOTAL_GIB), str(T4_CONTEXT_GIB)
    else:
        env.pop("QADAPTER_T4_GIB", None), env.pop("QADAPTER_T4_CONTEXT_GIB", None)
    command = [sys.executable, __file__, "--one", str(path), "--out", str(args.out),
               "--cell-timeout", str(args.cell_timeout)] + (["--watch-device"] if watch_device else [])
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = child.communicate(timeout=args.notebook_timeout)
        stuck = False
    except subprocess.TimeoutExpired:  # a cell that ignores the cell timeout, a kernel that never starts or exits
        kill_tree(child.pid)
        _, stderr = child.communicate()
        stuck = True
    row_file = args.out / f"{path.stem}.row.json"
    if row_file.exists():
        row = json.loads(row_file.read_text())
        row_file.unlink()
        if stuck:
            row["note"] = f"finished, but its process did not exit within {args.notebook_timeout} s: killed"
        return row
    if stuck:
        return dict(unmeasured_row(path, "failed", f"no result within {args.notebook_timeout} s "
                                                   f"(--notebook-timeout): the notebook's process, its kernel and "
                                                   f"their children were killed"),
                    seconds=round(time.perf_counter() - started, 1))
    return unmeasured_row(path, "failed", f"the runner's child failed: {stderr[-300:]}")


def kill_tree(pid: int) -> None:
    """Kill process `pid` and every process below it (Jupyter starts kernels in sessions of their own, so a process
    group kill would miss them)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for process in [*parent.children(recursive=True), parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def t4_minutes(seconds: float, rate: float | None, peak_allocated_gib: float | None = None) -> float | None:
    """Estimated minutes on a T4: the wall time scaled by (this GPU's measured fp16 rate / a T4's 65 TFLOP/s).
    Everything is scaled, loading and Python overhead included, so this errs on the long side for those parts.
    A notebook that allocated no GPU memory ran on the CPU: its time is not scaled."""
    if rate is None:
        return None
    return round(seconds / 60 * (1 if peak_allocated_gib == 0 else rate / T4_FP16_TFLOPS), 1)


def write_table(rows: list[dict], meta: dict, out_dir: Path) -> None:
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    fmt = lambda v, spec="{}": "" if v is None else spec.format(v)  # noqa: E731
    lines = [f"# Notebooks on {meta['gpu']}{' as a T4 stand-in' if meta['t4'] else ''}", "",
             f"Model `{meta['model']}`; mode: {meta['mode']}; measured fp16 matrix rate "
             f"{fmt(meta['fp16_tflops'], '{:.0f}')} TFLOP/s (T4 estimate = wall time x rate / "
             f"{T4_FP16_TFLOPS:.0f}); `{meta['command']}`.", "",
             "| notebook | status | wall time (s) | T4 estimate (min) | peak allocated (GiB) | peak reserved (GiB) "
             "| peak on the device, CUDA contexts included (GiB) | slowest cells | last cells to raise the peak "
             "| first error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['notebook']} | {r['status']} | {r['seconds']:.0f} | {fmt(r['t4_minutes'])} | "
                     f"{fmt(r['peak_allocated_gib'])} | {fmt(r['peak_reserved_gib'])} | "
                     f"{fmt(r['peak_device_gib'])} | {r.get('slowest_cells') or ''} | {r.get('peak_cells') or ''} | "
                     f"{'; '.join(x for x in (r['error'], r.get('note')) if x).replace('|', '/')} |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the executed notebooks and the table")
    parser.add_argument("--t4", action="store_true",
                        help=f"stand in for a Colab T4 (reports {T4_TOTAL_GIB} GiB; PyTorch's allocator capped at "
                             f"{T4_TOTAL_GIB - T4_CONTEXT_GIB:.2f} GiB; no bf16, so fp16)")
    parser.add_argument("--only", nargs="*", help="notebook numbers or name prefixes, e.g. 00 04")
    parser.add_argument("--cell-timeout", type=int, default=1200, help="seconds one cell may take")
    parser.add_argument("--notebook-timeout", type=int, default=1800,
                        help="seconds one notebook may take in all, kernel start and exit included: then its process "
                             "tree is killed and the runner goes on with the next notebook")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds: start no further notebook after this (the rest are listed as not run)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks at a time after the first (which builds shared caches) for a quick check "
                             "of many notebooks on a big GPU; times then include the others' load: use 1 to time")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: the child that runs one notebook
    parser.add_argument("--watch-device", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        row = execute(args.one, args.out, args.cell_timeout, args.watch_device)
        (args.out / f"{args.one.stem}.row.json").write_text(json.dumps(row))
        return 0
    paths = notebooks(args.only)
    import torch

    if args.t4 and not torch.cuda.is_available():
        raise SystemExit("--t4 stands in for a Colab T4 on a CUDA GPU, and this machine has none: run the notebooks "
                         "on the CPU with `make run` (the tiny model), or without --t4")
    rate = fp16_tflops()
    stand_in = make_stand_in()
    meta = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU", "t4": args.t4,
            "mode": (f"T4 stand-in ({T4_TOTAL_GIB} GiB, of which {T4_CONTEXT_GIB} GiB for the CUDA context: "
                     f"PyTorch's allocator capped at {T4_TOTAL_GIB - T4_CONTEXT_GIB:.2f} GiB; fp16)"
                     if args.t4 else "as is")
                    + (f", {args.jobs} notebooks at a time" if args.jobs > 1 else ""),
            "model": os.environ.get("QADAPTER_MODEL") or "qu.default_model()", "fp16_tflops": rate,
            "command": "python scripts/run_notebooks.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows, begun = {}, time.perf_counter()

    def run(path, alone):
        if args.time_limit and time.perf_counter() - begun > args.time_limit:
            row = unmeasured_row(path, "not run (time limit)")
        else:
            print(f"== {path.name}", flush=True)
            row = run_one(path, args, stand_in, watch_device=alone)
            print(f"   {path.name} {row['status']} in {row['seconds']:.0f} s, peak reserved "
                  f"{row['peak_reserved_gib']} GiB{', ' + row['error'] if row['error'] else ''}", flush=True)
        rows[path] = dict(row, t4_minutes=t4_minutes(row["seconds"], rate, row["peak_allocated_gib"]))
        write_table([rows[p] for p in paths if p in rows], meta, args.out)

    run(paths[0], alone=True)  # alone: it builds what the others share (e.g. a random checkpoint on disk)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(lambda p: run(p, alone=args.jobs == 1), paths[1:]))
    return 0 if all(r["status"] == "passed" for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
