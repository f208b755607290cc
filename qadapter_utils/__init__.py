"""qadapter_utils: what the qadapter notebooks and their readers reuse.

Each public function's docstring names the notebook that introduces it. Names are imported lazily, so
`import qadapter_utils` stays cheap.

The copy-alone rule: a module copied out of the package, into another project's folder, works there beside the
siblings it needs and no others (tests/test_copy_alone.py copies each into an empty folder and calls it in a
Python that cannot import qadapter_utils).

- Stand alone (import no sibling): env, guards, quant, weights, loss, tiny/corpus.py; data too, except for the
  embedded task (world_qa, load_instruction_data("world")), which needs corpus.py beside it.
- A module that needs siblings says so in its docstring's "Needs ..." line (the README's "needs" column lists the
  whole set to copy, siblings of siblings included), and imports each at the top of the file, never inside a
  function (a hidden import only fails on the path that reaches it):

      try:  # inside the qadapter_utils package
          from .guards import UsageError
      except ImportError:  # copied next to guards.py
          from guards import UsageError

  The relative import raises ImportError exactly when there is no parent package; the absolute one then finds the
  copy beside it (and if the sibling was not copied, its ModuleNotFoundError names the missing file). Copies are
  flat: tiny/corpus.py is copied as corpus.py next to data.py, compat.py or build.py.
- memory/ is a package and the unit to copy is the folder, whole (its four files import each other relatively).
  It needs quant.py beside the folder. Shape names ("llama2-7b") need models.py and adapter names ("lora") need
  methods.py (the presets): without them, pass a transformers config and an adapters config object; a name raises
  a ValueError that says what to copy, never silently means adapters' config of the same name.
- What another module uses is public (no leading underscore); a helper has one home, and a sibling imports it from
  there. A few one-line helpers (a tensor's byte count, splitting a ConfigUnion into its parts) are repeated in
  modules that would otherwise need a sibling only for them.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_model": "models", "default_model": "models", "bnb_config": "models", "model_config": "models",
    "ModelLoadError": "models", "SHAPES": "models",
    "footprint": "weights", "dequantized_weight": "weights",
    "add_adapter": "methods", "trainable_summary": "methods", "PRESETS": "methods", "DESCRIPTIONS": "methods",
    "adapter_config": "methods", "add_fusion": "methods", "save_adapter": "methods", "load_adapter": "methods",
    "AdapterMethodError": "methods",
    "weight_memory": "quant", "bits_per_param": "quant", "measured_weight_memory": "quant",
    "merge_lora": "merge",
    "make_trainer": "train", "evaluate": "train", "world_qa": "data", "load_instruction_data": "data",
    "estimate_training_memory": "memory", "measure_training_memory": "memory", "profile_training_step": "memory",
    "fits": "memory", "max_batch_size": "memory", "max_seq_len": "memory",
}
__all__ = sorted(_EXPORTS) + ["env", "quant"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"qadapter_utils.{_EXPORTS[name]}"), name)
    if name in ("env", "quant", "models", "methods", "data", "train", "memory", "weights", "compat", "merge", "loss",
                "fast"):
        return importlib.import_module(f"qadapter_utils.{name}")
    raise AttributeError(f"module 'qadapter_utils' has no attribute {name!r}")
