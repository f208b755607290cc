"""What the package refuses, and the checks several modules share: the error types, "does this folder hold saved
work?", number checks with messages that say what to pass instead, and writing a folder beside its target and
renaming it into place, so that a kill mid-write never leaves a half-written adapter or checkpoint under the name.

    check_number("r", r, low=1, integer=True, hint="LoRA's rank, e.g. r=8")
    if saved_work(folder): ...                    # names in folder that look like someone's saved work
    with folder_written_atomically(folder, overwrite=False) as tmp:
        ...write into tmp...                      # renamed to `folder` only when the block ends without error

Every error is raised before anything is changed. Standard library only: works when copied alone.
Used by qadapter_utils.methods and qadapter_utils.train (05_training, 04_adapters_on_quantized).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from numbers import Real
from pathlib import Path


class UsageError(ValueError):
    """Bad input, refused before anything was changed; the message says what to pass instead."""


class SavedWorkError(FileExistsError):
    """A write that would replace saved work (an adapter, a checkpoint, model weights, a tokenizer) was refused;
    nothing was written. The message says how to keep both, or how to replace on purpose."""


class IntegrityError(ValueError):
    """A saved file is truncated, unreadable, holds non-finite values or does not match its config; the message
    names the file. Nothing was loaded into the model."""


#: File names (and name starts) that count as saved work: adapters, Trainer checkpoints, model weights, tokenizers.
SAVED_WORK_NAMES = ("checkpoint-", "adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin",
                    "adapter_model", "head_config.json", "model_head", "pytorch_model_head", "model.safetensors",
                    "model-0", "pytorch_model", "tf_model", "config.json", "generation_config.json", "tokenizer",
                    "special_tokens_map.json", "vocab.", "merges.txt", "trainer_state.json", "training_args.bin",
                    "optimizer.", "scheduler.", "rng_state", "qadapter_run.json")
#: Suffixes that count as saved work whatever the name: tensors and pickles.
SAVED_WORK_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def _is_work(path: Path) -> bool:
    if path.name.startswith(SAVED_WORK_NAMES) or path.suffix in SAVED_WORK_SUFFIXES:
        return True
    return path.is_dir() and any(_is_work(child) for child in path.iterdir())


def saved_work(folder: str | Path) -> list[str]:
    """Sorted names in `folder` that look like saved work (SAVED_WORK_NAMES, SAVED_WORK_SUFFIXES, or a subfolder
    holding such files); [] when the folder does not exist. (05_training)"""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and _is_work(p))


def describe(names: list[str], most: int = 4) -> str:
    """'a, b, c, d, ...': the first `most` names of a list, for messages."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False, hint: str = "") -> None:
    """Raise UsageError unless `value` is a finite real number (an int when integer=True; bools are refused) in
    [low, high] (an open end where low_open / high_open). `hint` ends the message: what to pass instead."""
    kind = "an integer" if integer else "a number"
    bounds = _bounds(low, high, low_open, high_open)
    wanted = f"{name} must be {kind}{bounds}" + (f": {hint}" if hint else "")
    if isinstance(value, bool) or not isinstance(value, Real) or (integer and not float(value).is_integer()):
        raise UsageError(f"{name}={value!r}: {wanted}")
    if integer and not isinstance(value, int):
        raise UsageError(f"{name}={value!r}: {wanted} (pass {int(value)}, not a float)")
    if not math.isfinite(value):
        raise UsageError(f"{name}={value!r}: {wanted}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise UsageError(f"{name}={value!r}: {wanted}")


def _bounds(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


@contextlib.contextmanager
def folder_written_atomically(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new empty sibling folder of `target`; when the block ends without error, it takes `target`'s
    place (os.replace of a folder: atomic on one file system), else it is removed. An existing `target` is
    replaced only when overwrite=True, and only if it holds nothing but saved work (no notes or data of yours
    would be deleted); the old folder is renamed aside first and removed after the swap, so at every moment
    one complete version exists. (04_adapters_on_quantized, 05_training)"""
    target = Path(target).expanduser()
    existing = target.exists() and any(target.iterdir())
    if existing:
        _check_replaceable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.writing-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_into_place(tmp, target, target.parent / f".{target.name}.old-{tag}")


def _check_replaceable(target: Path, overwrite: bool) -> None:
    if not target.is_dir():
        raise SavedWorkError(f"{target.name!r} exists and is not a folder; nothing was written. Choose a folder "
                             f"name that does not exist yet.")
    work = saved_work(target)
    if not overwrite:
        raise SavedWorkError(f"{target.name!r} is not empty ({describe(sorted(p.name for p in target.iterdir()))})"
                             f"; nothing was written. Choose another folder or pass overwrite=True.")
    other = sorted(p.name for p in target.iterdir() if p.name not in work)
    if other:
        raise SavedWorkError(f"{target.name!r} also holds files that are not saved work ({describe(other)}), "
                             f"which overwrite=True would delete; nothing was written. Choose another folder.")


def _swap_into_place(tmp: Path, target: Path, aside: Path) -> None:
    if target.exists():
        os.replace(target, aside)
    os.replace(tmp, target)
    shutil.rmtree(aside, ignore_errors=True)

