"""The measured compatibility matrix: which adapter methods work on which quantized base.

For each method (a preset of qadapter_utils.methods) x base precision (unquantized, 8-bit LLM.int8(), 4-bit NF4 +
double quant) x architecture (Llama: the embedded "tiny" model; Mistral with grouped-query attention:
"random:mistral-tiny"), one cell records whether
  1. the adapter can be added (through `add_adapter`; our clear errors are recorded with their message),
  2. 3 training steps on one batch give finite, strictly decreasing loss, and in the last step every adapter
     kind of tensor receives a non-zero gradient (a loss can fall while part of an adapter is cut off),
  3. saving the adapter alone (safetensors) and loading it back gives identical logits (torch.equal).

    python -m qadapter_utils.compat            # writes docs/compat_matrix.md and docs/compat_matrix.json

tests/test_compat.py regenerates it and compares with the committed table. Introduced in
notebooks/04_adapters_on_quantized.ipynb. Needs methods, models (to load models) and
tiny/corpus.py (the held-out batch); methods and models need guards, weights, env and quant in turn.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
import time
import warnings
from pathlib import Path

import torch

try:  # inside the qadapter_utils package
    from .methods import DESCRIPTIONS, AdapterMethodError, add_adapter, load_adapter, save_adapter
    from .models import load_model
    from .tiny.corpus import corpus
except ImportError:  # copied next to its siblings (the copy-alone rule: qadapter_utils/__init__.py)
    from corpus import corpus
    from methods import DESCRIPTIONS, AdapterMethodError, add_adapter, load_adapter, save_adapter
    from models import load_model

# The presets of qadapter_utils.methods, less close variants (prefix_flat, compacter++, noreft, direft) to keep
# the whole matrix around a minute on a small CPU.
METHODS = ["lora", "lora_all", "dora", "ia3", "vera", "prefix", "seq_bn", "double_seq_bn", "par_bn", "seq_bn_inv",
           "compacter", "mam", "unipelt", "loreft", "prompt_tuning"]
PRECISIONS = {"unquantized": dict(bits=None), "8-bit": dict(bits=8), "4-bit NF4": dict(bits=4, quant_type="nf4",
                                                                                       double_quant=True)}
ARCHITECTURES = {"Llama": "tiny", "Mistral (GQA)": "random:mistral-tiny"}
STEPS, BATCH, SEQ_LEN, LR = 3, 2, 16, 1e-3
# Larger learning rates for methods whose per-step change is tiny at LR (same 3 steps, same batch).
LR_FOR = {"ia3": 1e-2}
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _load(model_name: str, precision: str):
    model, tokenizer = load_model(model_name, **PRECISIONS[precision])
    model.qadapter_batch = _batch(tokenizer)
    return model


def _batch(tokenizer) -> dict:
    """BATCH x SEQ_LEN tokens of held-out text from the embedded corpus, the last row cut to 2/3 and padded (as in
    a real batch: an attention mask exists, which is where prefix tuning under SDPA goes wrong)."""
    texts = corpus("validation", n_paragraphs=BATCH)
    batch = tokenizer(texts, return_tensors="pt", truncation=True, max_length=SEQ_LEN, padding="max_length")
    cut = 2 * SEQ_LEN // 3
    batch["input_ids"][-1, cut:] = tokenizer.pad_token_id
    batch["attention_mask"][-1, cut:] = 0
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _tensor_kinds_without_gradient(model) -> list[str]:
    """Names (layer numbers replaced by N) of the kinds of trainable tensors none of which got a non-zero
    gradient: a whole method cut off from the loss (as prefix tuning under SDPA in adapters 1.3.0), while single
    tensors unused by design (LoReFT's suffix unit with no suffix positions) do not count."""
    reached: dict[str, bool] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            kind = re.sub(r"\.\d+(?=\.|$)", ".N", name)
            reached[kind] = reached.get(kind, False) or (param.grad is not None and bool(param.grad.any()))
    return [kind for kind, ok in reached.items() if not ok]


def check_cell(model, method: str, workdir: Path) -> dict:
    """Run the three checks of one cell on `model` (adapters are added and deleted again); return
    {"status": "ok" | "error" | "fails", "detail": str, "losses": [...]}."""
    name = method.replace("+", "p")
    try:
        torch.manual_seed(0)
        name = add_adapter(model, method, name=name)
    except AdapterMethodError as err:
        text = str(err)
        instead = re.search(r"Use [^.]*\.", text)
        detail = re.split(r": |\. ", text)[0] + (f". {instead.group(0)}" if instead else "")
        return {"status": "error", "detail": detail, "losses": []}
    except Exception as err:  # an adapters failure we do not catch yet: record it
        return {"status": "fails", "detail": f"add: {type(err).__name__}: {str(err)[:120]}", "losses": []}
    loaded = None
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        # weight_decay=0.0 as in transformers' Trainer default; any weight decay makes LoReFT's orthogonal
        # projection stop acting after one step in adapters 1.3.0 (loss returns to the base model's)
        optimizer = torch.optim.AdamW(params, lr=LR_FOR.get(method, LR), weight_decay=0.0)
        inputs = model.qadapter_batch
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        losses = []
        for step in range(STEPS):
            loss = model(**inputs, labels=labels, use_cache=False).loss
            loss.backward()
            if step == STEPS - 1:  # by now (LoRA's B left zero) every kind of adapter tensor gets a gradient
                dead = _tensor_kinds_without_gradient(model)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        if dead:
            return {"status": "fails", "detail": f"no gradient reaches {len(dead)} kinds of adapter tensors "
                                                 f"(e.g. {dead[0]})", "losses": losses}
        if not all(math.isfinite(x) for x in losses):
            return {"status": "fails", "detail": "non-finite loss", "losses": losses}
        if not all(b < a for a, b in zip(losses, losses[1:])):
            return {"status": "fails", "detail": "loss did not decrease", "losses": losses}
        folder = workdir / name
        save_adapter(model, name, folder)
        if not (folder / "adapter.safetensors").exists():
            return {"status": "fails", "detail": "save wrote no safetensors file", "losses": losses}
        model.eval()
        with torch.no_grad():
            before = model(**inputs).logits
        loaded = load_adapter(model, folder, name=f"{name}_loaded")
        with torch.no_grad():
            after = model(**inputs).logits
        if not torch.equal(before, after):
            diff = (before - after).abs().max().item()
            return {"status": "fails", "detail": f"reloaded logits differ (max {diff:.2e})", "losses": losses}
        return {"status": "ok", "detail": "", "losses": losses}
    except Exception as err:
        return {"status": "fails", "detail": f"{type(err).__name__}: {str(err)[:120]}", "losses": []}
    finally:
        for adapter in (name, loaded):
            if adapter and adapter in model.adapters_config:
                model.delete_adapter(adapter)


def compute(methods=None, precisions=None, architectures=None, verbose: bool = False) -> dict:
    """The matrix as a dict: {"cells": {arch: {precision: {method: cell}}}, "settings": ...}."""
    methods = methods or METHODS
    precisions = precisions or list(PRECISIONS)
    architectures = architectures or list(ARCHITECTURES)
    cells: dict = {}
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is ~4x faster than several on a shared CPU
    try:
        _compute(cells, methods, precisions, architectures, verbose)
    finally:
        torch.set_num_threads(threads)
    settings = {"steps": STEPS, "batch": BATCH, "seq_len": SEQ_LEN, "lr": LR, "lr_for": LR_FOR,
                "optimizer": "AdamW(weight_decay=0)", "models": ARCHITECTURES,
                "precisions": {k: dict(v) for k, v in PRECISIONS.items()}}
    if verbose:
        print(f"matrix computed in {time.perf_counter() - start:.1f} s")
    return {"settings": settings, "cells": cells}


def _compute(cells, methods, precisions, architectures, verbose):
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch in architectures:
            for precision in precisions:
                model = _load(ARCHITECTURES[arch], precision)
                for method in methods:
                    cell = check_cell(model, method, Path(tmp) / f"{arch}-{precision}".replace(" ", "_"))
                    cells.setdefault(arch, {}).setdefault(precision, {})[method] = cell
                    if verbose:
                        print(f"{arch:14} {precision:12} {method:14} {cell['status']:6} {cell['detail'][:60]} "
                              f"{[round(x, 3) for x in cell['losses']]}", flush=True)
                del model


def statuses(matrix: dict) -> dict:
    """{arch: {precision: {method: status + detail}}}: the part of the matrix that must not drift."""
    return {arch: {prec: {m: (c["status"], c["detail"]) for m, c in row.items()} for prec, row in by_prec.items()}
            for arch, by_prec in matrix["cells"].items()}


_SYMBOL = {"ok": "✅", "error": "⛔", "fails": "❌"}


def to_markdown(matrix: dict) -> str:
    """The matrix as a markdown table (one row per method, one column per architecture x precision)."""
    cells = matrix["cells"]
    columns = [(arch, prec) for arch in cells for prec in cells[arch]]
    methods = list(next(iter(next(iter(cells.values())).values())))
    s = matrix["settings"]
    lines = [
        "# Compatibility matrix: adapter methods on quantized bases",
        "",
        "Generated by `python -m qadapter_utils.compat` (adapters 1.3.0, bitsandbytes 0.50.2, transformers 4.57.6, "
        "CPU); `tests/test_compat.py` regenerates it and compares. Each cell: the adapter is added with "
        "`qadapter_utils.add_adapter`, trained for "
        f"{s['steps']} steps (AdamW without weight decay, the Trainer's default; batch {s['batch']} x {s['seq_len']} "
        "tokens, one row padded) with finite, strictly decreasing loss and a gradient reaching every kind of adapter "
        "tensor, saved alone (safetensors) and loaded back with identical logits. Models: "
        + ", ".join(f"{arch} = `{name}`" for arch, name in s["models"].items()) + ".",
        "",
        "✅ all three checks pass · ⛔ `add_adapter` raises our clear error (reason given) · ❌ fails (reason given)",
        "",
        "| method | " + " | ".join(f"{arch}<br>{prec}" for arch, prec in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    notes = {}
    for method in methods:
        row = [f"`{method}`"]
        for arch, prec in columns:
            cell = cells[arch][prec][method]
            mark = _SYMBOL[cell["status"]]
            if cell["detail"]:
                key = notes.setdefault(cell["detail"], len(notes) + 1)
                mark += f" [{key}]"
            row.append(mark)
        lines.append("| " + " | ".join(row) + " |")
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"{key}. {detail}" for detail, key in notes.items()]
    lines += ["", "Methods:", ""]
    lines += [f"- `{m}`: {DESCRIPTIONS.get(m, '')}" for m in methods]
    return "\n".join(lines) + "\n"


def write(matrix: dict, folder: Path = DOCS) -> tuple[Path, Path]:
    """Write compat_matrix.md and compat_matrix.json into `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / "compat_matrix.md", folder / "compat_matrix.json"
    md.write_text(to_markdown(matrix))
    rounded = json.loads(json.dumps(matrix))
    for by_prec in rounded["cells"].values():
        for row in by_prec.values():
            for cell in row.values():
                cell["losses"] = [round(x, 4) for x in cell["losses"]]
    js.write_text(json.dumps(rounded, indent=1, ensure_ascii=False) + "\n")
    return md, js


def main() -> None:
    matrix = compute(verbose=True)
    md, js = write(matrix)
    print(f"wrote {md.relative_to(md.parent.parent)} and {js.relative_to(js.parent.parent)}")


if __name__ == "__main__":
    main()
