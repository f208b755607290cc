"""What a quantized model holds: `footprint` (which modules were quantized, their bytes) and `dequantized_weight`
(the full-precision weight behind an nn.Linear, bitsandbytes `Linear4bit` or `Linear8bitLt`).

    model, tok = qadapter_utils.load_model("tiny", bits=4)
    footprint(model)                 # one row per kind of module; the bytes total equals model.get_memory_footprint()
    w = dequantized_weight(model.model.layers[0].self_attn.q_proj)

bitsandbytes dequantizes on the fly inside its matmul, but has no one call that returns a layer's weight in every
state it can be in; the CPU repacking in particular (below) is undone here by hand, without touching the module.
On the CPU, bitsandbytes 0.50 repacks a `Linear4bit` weight into a CPU layout at its first eval-mode forward when the
processor has AVX512-BF16: `weight.data` becomes [N, K/2], the 4-bit codes are reordered in 32-row tiles, and the
block scales (absmax) are dequantized (double quant undone) and stored as bf16, transposed. The weight the layer then
computes with is code[q] * absmax_bf16; that is what `dequantized_weight` returns for a repacked layer.

Introduced in notebooks/02_loading_quantized.ipynb. Works when copied alone (needs only the pinned libraries).
"""
from __future__ import annotations

import copy

import torch

try:  # bitsandbytes is optional: without it nothing is quantized
    import bitsandbytes as bnb
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
except ImportError:  # pragma: no cover
    bnb = None
    Linear4bit = Linear8bitLt = ()


def _tensor_bytes(t) -> int:
    return t.nelement() * t.element_size() if torch.is_tensor(t) else 0


def quant_constant_bytes(module: torch.nn.Module) -> int:
    """Bytes of the quantization constants bitsandbytes keeps beside a quantized layer's weight (4-bit: block
    scales absmax, the second-level scales and offset of double quantization, the 16-value code book; 8-bit: one
    fp32 scale per output row). `get_memory_footprint` does not count these: they are not parameters or buffers."""
    weight = getattr(module, "weight", None)
    if isinstance(module, Linear4bit) and getattr(weight, "quant_state", None) is not None:
        qs = weight.quant_state
        total = _tensor_bytes(qs.absmax) + _tensor_bytes(qs.code) + _tensor_bytes(getattr(qs, "offset", None))
        if getattr(qs, "nested", False) and qs.state2 is not None:
            total += _tensor_bytes(qs.state2.absmax) + _tensor_bytes(qs.state2.code)
        return total
    if isinstance(module, Linear8bitLt):
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        return _tensor_bytes(scb)
    return 0


def _kind(module: torch.nn.Module, path: str) -> str:
    """A short label for what a leaf module is and how it is stored."""
    weight = getattr(module, "weight", None)
    if isinstance(module, Linear4bit):
        qs = getattr(weight, "quant_state", None)
        quant_type = getattr(qs, "quant_type", None) or getattr(weight, "quant_type", "4bit")
        nested = " + double quant" if (getattr(qs, "nested", False) or getattr(qs, "original_nested", False)) else ""
        return f"Linear4bit ({quant_type}{nested})"
    if isinstance(module, Linear8bitLt):
        return "Linear8bitLt (int8)"
    dtype = str(weight.dtype).replace("torch.", "") if torch.is_tensor(weight) else ""
    name = type(module).__name__
    if isinstance(module, torch.nn.Linear):
        label = "lm_head" if path.split(".")[-1] == "lm_head" else "Linear"
        return f"{label} ({name}, {dtype})"
    return f"{name} ({dtype})" if dtype else name


def logical_numel(param: torch.Tensor) -> int:
    """Number of weights a parameter stands for (a packed 4-bit parameter holds two per byte). (02_loading_quantized;
    used by qadapter_utils.methods.trainable_summary and benchmarks/)"""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return param.numel()


def _logical_params(module: torch.nn.Module) -> int:
    """Number of values the module's own parameters stand for (a packed 4-bit byte holds two weights)."""
    return sum(logical_numel(param) for param in module.parameters(recurse=False))


def footprint(model: torch.nn.Module, by: str = "kind"):
    """A pandas DataFrame of what the model's memory holds: by="kind" one row per kind of module (Linear4bit
    (nf4 + double quant), Linear8bitLt, Embedding, lm_head, RMSNorm, ...), by="module" one row per module.
    Columns: quantized, modules, params (weights stood for), bytes (parameters + buffers, as
    `model.get_memory_footprint()` counts them; the "total" row equals it), bits/param, quant_const_bytes (block
    scales etc., which get_memory_footprint does not count) and bits/param incl. those constants.
    (02_loading_quantized)"""
    import pandas as pd

    if by not in ("kind", "module"):
        raise ValueError(f"by={by!r}: use 'kind' (one row per kind of module) or 'module' (one row per module)")
    rows = []
    for path, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not own:
            continue
        kind = _kind(module, path)
        rows.append({"module": path or "(root)", "kind": kind,
                     "quantized": isinstance(module, (Linear4bit, Linear8bitLt)),
                     "modules": 1, "params": _logical_params(module),
                     "bytes": sum(_tensor_bytes(t) for t in own),
                     "quant_const_bytes": quant_constant_bytes(module)})
    frame = pd.DataFrame(rows, columns=["module", "kind", "quantized", "modules", "params", "bytes",
                                        "quant_const_bytes"])
    if by == "kind":
        frame = (frame.groupby("kind", sort=False)
                 .agg(quantized=("quantized", "first"), modules=("modules", "sum"), params=("params", "sum"),
                      bytes=("bytes", "sum"), quant_const_bytes=("quant_const_bytes", "sum")))
    else:
        frame = frame.set_index("module")
    total = pd.DataFrame([{"kind": "", "quantized": bool(frame["quantized"].any()),
                           "modules": int(frame["modules"].sum()), "params": int(frame["params"].sum()),
                           "bytes": int(frame["bytes"].sum()),
                           "quant_const_bytes": int(frame["quant_const_bytes"].sum())}], index=["total"])
    if by == "kind":
        total = total.drop(columns="kind")
    frame = pd.concat([frame, total])
    params = frame["params"].where(frame["params"] > 0)
    frame["bits/param"] = (8 * frame["bytes"] / params).round(3)
    frame["bits/param incl. consts"] = (8 * (frame["bytes"] + frame["quant_const_bytes"]) / params).round(3)
    return frame


def _unpack_cpu_layout(layer_weight: torch.Tensor, quant_state):
    """(packed 4-bit data in bitsandbytes' canonical layout, a QuantState copy that dequantize_4bit reads) for a
    weight repacked by bitsandbytes for the CPU. Nothing of the module is modified: bitsandbytes' inverse is run on
    a copy of the quant state, and the block scales are restored from the repacked bf16 ones (not re-quantized,
    so the result is the weight the repacked layer computes with)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = copy.copy(quant_state)  # shallow: the inverse reassigns fields; it does not write into tensors
    absmax = quant_state.absmax.T.reshape(-1).to(torch.float32)  # [K/bs, N] bf16 -> canonical block order
    state.original_nested = False  # skip the inverse's re-quantization of absmax (lossy)
    data, state = _convert_weight_packed_for_cpu_inverse(layer_weight, state)
    state.absmax = absmax
    state.nested = False
    state.state2 = None
    state.offset = None
    state.packing_format_for_cpu = False
    return data, state


def dequantized_weight(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full-precision weight [out_features, in_features] of an nn.Linear, a bitsandbytes Linear4bit (NF4/FP4,
    with or without double quant, repacked for the CPU or not) or Linear8bitLt: a new tensor, the module is left
    unchanged. dtype: the result's dtype (default: the dtype the weight was quantized from for 4-bit, fp32 for
    8-bit, the weight's own dtype for nn.Linear). Also accepts adapters' LoRA-wrapped layers.
    (02_loading_quantized; used by qadapter_utils.merge)"""
    weight = getattr(module, "weight", None)
    if weight is None:
        raise TypeError(f"{type(module).__name__} has no weight: pass an nn.Linear, bitsandbytes Linear4bit or "
                        f"Linear8bitLt module")
    with torch.no_grad():
        if isinstance(module, Linear4bit):
            quant_state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
            if quant_state is None:  # not quantized yet (weights still on the meta/original device)
                out = weight.data.clone()
            elif getattr(quant_state, "packing_format_for_cpu", False):
                data, state = _unpack_cpu_layout(weight.data, quant_state)
                out = bnb.functional.dequantize_4bit(data, state)
            else:
                out = bnb.functional.dequantize_4bit(weight.data, quant_state)
        elif isinstance(module, Linear8bitLt):
            scb = getattr(weight, "SCB", None)
            if scb is None:
                scb = getattr(getattr(module, "state", None), "SCB", None)
            if weight.dtype != torch.int8 or scb is None:  # has_fp16_weights=True: still a float weight
                out = weight.data.clone()
            else:
                out = bnb.functional.int8_vectorwise_dequant(weight.data, scb)
        elif isinstance(module, torch.nn.Linear):
            out = weight.detach().clone()
        else:
            raise TypeError(f"{type(module).__name__} is not a linear layer: pass an nn.Linear, bitsandbytes "
                            f"Linear4bit or Linear8bitLt module")
    return out.to(dtype) if dtype is not None else out


def keep_4bit_layers_trainable(model: torch.nn.Module) -> list[str]:
    """Make every 4-bit layer of `model` trainable on this CPU and keep it so; return the paths of layers that had
    been repacked. On CPUs with AVX512-BF16, bitsandbytes 0.50.2 repacks a Linear4bit for inference at its first
    eval-mode forward (an evaluation during training, a generate), and a repacked layer's forward has no autograd:
    from then on no gradient reaches anything before it (LoRA on q/v, a prefix), silently. Repacked layers are
    put back into bitsandbytes' canonical layout with the block scales they computed with (_unpack_cpu_layout),
    and repacking is switched off for the model's layers. Other CPUs never repack: there this changes nothing.
    (05_training)"""
    restored = []
    for path, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _unpack_cpu_layout(module.weight.data, state)
            restored.append(path)
    return restored
