"""Merging a LoRA (or (IA)^3) adapter into a quantized model for deployment: `merge_lora` returns a new, plain
model whose linear layers hold the dequantized base weight with the adapter folded in.

    merged = merge_lora(model, "lora")          # model: 4-bit or 8-bit base + trained LoRA; left unchanged
    merged.save_pretrained("llama2-7b-merged")  # a normal checkpoint: no adapters, no bitsandbytes needed
    requantized = requantize(merged, bits=4)    # optional: quantize the merged weights again (costs accuracy)

Why not adapters' own `model.merge_adapter(name)`: on a bitsandbytes 4-bit base (adapters 1.3.0, bitsandbytes
0.50) it writes the merged full-precision matrix back into the `Params4bit` object, still flagged as quantized, so
the layer later reads float bytes as packed 4-bit codes and the logits are wrong (notebook 06 shows it;
tests/test_merge.py checks it), and it changes the caller's model in place. Merging into 4-bit codes is lossy
anyway: W + BA is not representable on the NF4 grid of W. So the merged weight is kept in full precision
(the compute dtype: bf16/fp16 on GPUs, fp32 on the CPU), in a new model built from the same config.

What it costs: the merged model has a full-precision copy of every linear layer (Llama 2-7B: 13.5 GB in bf16
versus 3.9 GB in 4-bit); pass device="cpu" to build it in CPU memory. The merged logits equal the adapter-on
4-bit model's up to float rounding (both compute x @ dequant(W).T in the compute dtype; measured on the tiny
model: max |difference| ~1e-5 for logits up to ~16, tests/test_merge.py allows 1e-4). Against an 8-bit base in
eval mode they differ more (tiny model: max ~0.3, mean ~0.03), because LLM.int8() also rounds the activations to
int8, which a merged float model does not; the merged weights themselves are exact. On a CPU with AVX512-BF16,
bitsandbytes runs eval-mode 4-bit layers through a bf16 kernel: expect bf16-sized differences there.

Introduced in notebooks/06_merging_and_fusion.ipynb. Needs weights (dequantized_weight), guards
(folder_written_atomically) and models (bnb_config; models itself needs env, quant, weights).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

try:  # inside the qadapter_utils package
    from .guards import folder_written_atomically
    from .models import bnb_config
    from .weights import dequantized_weight
except ImportError:  # copied next to its siblings (the copy-alone rule: qadapter_utils/__init__.py)
    from guards import folder_written_atomically
    from models import bnb_config
    from weights import dequantized_weight


class MergeError(ValueError):
    """Raised by merge_lora with a message that says what to do instead."""


def _lora_layers(model, adapter_name: str) -> dict[str, torch.nn.Module]:
    """Module path -> adapters LoRA-wrapped linear layer that holds `adapter_name`."""
    from adapters.methods.lora import LoRALinear

    return {path: module for path, module in model.named_modules()
            if isinstance(module, LoRALinear) and adapter_name in module.loras}


def _check(model, adapter_name: str) -> dict[str, torch.nn.Module]:
    if not hasattr(model, "adapters_config"):
        raise MergeError("the model has no adapters: merge_lora needs a model with a trained LoRA adapter "
                         "(qadapter_utils.methods.add_adapter(model, 'lora') and training)")
    if adapter_name not in model.adapters_config:
        raise MergeError(f"the model has no adapter named {adapter_name!r}; it has "
                         f"{list(model.adapters_config.adapters)}")
    layers = _lora_layers(model, adapter_name)
    if not layers:
        raise MergeError(f"adapter {adapter_name!r} is not a LoRA-type adapter (it has no weights inside linear "
                         f"layers): only LoRA and (IA)^3 can be merged into the base weights. Keep bottleneck "
                         f"adapters, prefix tuning etc. as adapters, or train a LoRA ('lora', 'lora_all').")
    for path, layer in layers.items():
        lora = layer.loras[adapter_name]
        kind = type(lora).__name__
        if kind not in ("LoRA", "IA3"):
            raise MergeError(f"{path}: {kind} adapters cannot be merged by merge_lora (supported: LoRA and "
                             f"(IA)^3); keep the adapter unmerged")
        if getattr(lora, "use_gating", False):
            raise MergeError(f"{path}: adapter {adapter_name!r} uses gating (its contribution depends on the "
                             f"input), which no fixed weight can represent; keep it unmerged")
        if getattr(lora, "use_dora", False):
            raise MergeError(f"{path}: DoRA adapters are not merged by merge_lora; keep it unmerged")
        if layer.merged:
            raise MergeError(f"{path}: adapter {layer.merged!r} was merged in place by adapters' merge_adapter, "
                             f"which corrupts a quantized weight; reload the base model and the saved adapter, "
                             f"then call merge_lora")
        if getattr(layer, "fan_in_fan_out", False):
            raise MergeError(f"{path}: fan_in_fan_out layers (GPT-2 style Conv1D) are not supported")
    return layers


def merged_weight(layer: torch.nn.Module, adapter_name: str, dtype: torch.dtype = torch.float32) -> tuple:
    """(weight, bias) of one adapters LoRA-wrapped linear layer with adapter `adapter_name` folded in, computed
    in fp32 from the dequantized base weight and returned in `dtype`: LoRA W + (alpha/r) B A; (IA)^3
    diag(alpha * l) W (and the bias scaled alike). (06_merging_and_fusion)"""
    lora = layer.loras[adapter_name]
    weight = dequantized_weight(layer).to(torch.float32)
    bias = layer.bias.detach().to(torch.float32) if getattr(layer, "bias", None) is not None else None
    with torch.no_grad():
        if type(lora).__name__ == "IA3":
            scale = (lora.lora_B.detach().to(torch.float32) * lora.scaling).reshape(-1)  # one factor per output
            weight = weight * scale[:, None]
            if bias is not None:
                bias = bias * scale
        else:
            delta = lora.lora_B.detach().to(torch.float32) @ lora.lora_A.detach().to(torch.float32)
            weight = weight + delta.to(weight.device) * lora.scaling
    return weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def _plain_config(model):
    config = copy.deepcopy(model.config)
    for attribute in ("quantization_config", "adapters", "_pre_quantization_dtype"):
        if attribute in config.__dict__:
            delattr(config, attribute)
    return config


def _merged_tensors(model, adapter_name: str, dtype: torch.dtype | None):
    """(the plain model built empty on the meta device, dtype, generator of (state-dict key, merged tensor)): every
    tensor of the plain model, computed from `model` one at a time, so a caller can place or write each before the
    next exists."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    layers = _check(model, adapter_name)
    dtype = dtype or model.get_input_embeddings().weight.dtype
    config = _plain_config(model)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    old_modules = dict(model.named_modules())

    def tensors():
        for key in skeleton.state_dict():
            path, _, leaf = key.rpartition(".")
            old = old_modules.get(path)
            if old is None:
                raise MergeError(f"{key}: no module {path!r} in the adapter model; merge_lora expects the same "
                                 f"architecture (is this model wrapped by another library?)")
            if path in layers:
                weight, bias = merged_weight(old, adapter_name, dtype)
                yield key, weight if leaf == "weight" else bias
            elif isinstance(old, torch.nn.Linear) and leaf == "weight":
                yield key, dequantized_weight(old).to(dtype)   # quantized layers without this adapter, or plain ones
            else:  # embeddings, norms, lm_head: copied (cloned, so the two models never share storage)
                source = getattr(old, leaf).detach()
                yield key, (source.to(dtype) if source.is_floating_point() else source).clone()

    return skeleton, dtype, tensors()


def merge_lora(model, adapter_name: str, dtype: torch.dtype | None = None, device=None):
    """A new model (same architecture, no adapters, no quantization) whose linear layers hold the dequantized
    base weights of `model` with LoRA (or (IA)^3) adapter `adapter_name` merged in, in `dtype` (default: the
    compute dtype, that of the input embeddings) on `device` (default: where the embeddings are); every other
    weight (embeddings, norms, lm_head) is copied. `model` itself is not modified; its other adapters are not
    part of the result. The result is in eval mode. Raises MergeError for adapters that cannot be merged
    (bottleneck, prefix, gated, DoRA, VeRA) or were already merged in place. Needs memory for the whole merged
    model beside `model`; where that is more than the GPU or RAM holds (Llama-2-7B on a T4 or in Colab's RAM),
    use save_merged, which writes it to disk a tensor at a time. (06_merging_and_fusion)"""
    device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
    merged, _, tensors = _merged_tensors(model, adapter_name, dtype)
    merged.load_state_dict({key: value.to(device) for key, value in tensors}, strict=True, assign=True)
    merged.tie_weights()
    merged.to(device)
    if getattr(model, "generation_config", None) is not None:
        merged.generation_config = copy.deepcopy(model.generation_config)
    merged.eval()
    return merged


def save_merged(model, adapter_name: str, folder, dtype: torch.dtype | None = None, tokenizer=None,
                max_shard_bytes: int = 2 * 2**30, overwrite: bool = False):
    """Write the model merge_lora would return into `folder` as a checkpoint (safetensors shards, config,
    generation config, and the tokenizer if given) without ever holding the merged model in memory: each tensor
    is merged, moved to the CPU and written with its shard (at most `max_shard_bytes` of RAM at a time). Load it
    with `qadapter_utils.models.load_model(folder)` in full precision, or with bits=4/8 to quantize the merged
    weights again. `model` is not modified. Written into a sibling folder and renamed into place; refuses a
    folder that already holds files unless overwrite=True (and then replaces only saved work). Returns the folder.
    (06_merging_and_fusion)"""

    skeleton, dtype, tensors = _merged_tensors(model, adapter_name, dtype)  # MergeError before anything is written
    with folder_written_atomically(folder, overwrite) as tmp:  # a merge cut short leaves no half checkpoint
        _write_merged(tmp, skeleton.config, dtype, tensors, max_shard_bytes)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(folder).expanduser()


def _write_merged(folder: Path, config, dtype, tensors, max_shard_bytes: int) -> None:
    """The tensors as safetensors shards of at most max_shard_bytes (with the index from_pretrained reads when
    there are several) and the config, into `folder`; one shard in memory at a time."""
    from safetensors.torch import save_file

    written, shard, size, total = [], {}, 0, 0  # written: (file name, keys) of each shard on disk

    def flush():
        name = f"part-{len(written):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        written.append((name, list(shard)))

    for key, value in tensors:
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue  # tied to the input embeddings: from_pretrained ties it again
        value = value.to("cpu").contiguous()
        nbytes = value.numel() * value.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[key], size, total = value, size + nbytes, total + nbytes
    if shard:
        flush()
    names = (["model.safetensors"] if len(written) == 1 else
             [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))])
    for (part, _), name in zip(written, names):
        (folder / part).rename(folder / name)
    if len(written) > 1:
        weight_map = {key: name for (_, keys), name in zip(written, names) for key in keys}
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.dtype = dtype
    config.save_pretrained(folder)


def requantize(merged, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True, folder=None):
    """The merged model quantized again with bitsandbytes (`bits` 4 or 8) through a save_pretrained /
    from_pretrained round trip with a BitsAndBytesConfig, as a user would deploy it; `folder` defaults to a
    temporary one. Returns the quantized model (eval mode). The merged weights do not lie on the quantization
    grid, so this costs some accuracy: compare its logits or task accuracy with the merged model's.
    (06_merging_and_fusion)"""
    import tempfile

    from transformers import AutoModelForCausalLM

    if bits not in (4, 8):
        raise MergeError(f"bits={bits!r}: requantize to 4 (NF4/FP4) or 8 (LLM.int8()) bits")
    dtype = merged.get_input_embeddings().weight.dtype
    folder = folder or tempfile.mkdtemp(prefix="qadapter-merged-")
    merged.save_pretrained(folder, safe_serialization=True)
    config = bnb_config(bits, quant_type, double_quant, compute_dtype=dtype)
    device = merged.get_input_embeddings().weight.device
    device_map = {"": device.index if device.type == "cuda" else str(device)}
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype,
                                                 device_map=device_map)
    model.eval()
    return model
