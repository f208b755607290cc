"""qadapter_utils: what the qadapter notebooks and their readers reuse.

Each public function's docstring names the notebook that introduces it. Names are imported lazily, so
`import qadapter_utils` stays cheap and a module copied alone into another project needs none of the others
(beyond the one sibling import named in its docstring).
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
