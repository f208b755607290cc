"""Estimating: the peak memory of a training step from the model's shape alone (no weights, no GPU).

    estimate = estimate_training_memory("llama2-7b", bits=4, adapter="lora", batch_size=4, seq_len=512)
    estimate.total, estimate.table(), estimate.recipe            # bytes, the breakdown term by term, the recipe
    estimate_training_memory("llama2-7b", seq_len=4096, recipe="plain")   # a Trainer without make_trainer
    layer_activations("llama2-7b", batch_size=1, seq_len=512)    # what one decoder layer keeps for backward

`estimate_training_memory` predicts the peak `torch.cuda.max_memory_allocated()` term by term, from how transformers
4.57 / adapters 1.3 / bitsandbytes 0.50 actually run a training step, for a named recipe (RECIPES): by default what
`qadapter_utils.train.make_trainer` runs on a GPU (autocast without the adapters' input casts, packed batches under
packed attention, the chunked loss, paged AdamW 8-bit, gradient checkpointing), or `recipe="plain"`, a Trainer with
bf16/fp16=True written without make_trainer; each piece is also an argument (autocast=False: the own loop of
memory.measure_training_memory). Terms: SDPA / packed (varlen) attention (no seq x seq matrix; eager attention,
which add_adapter uses for prefix tuning, keeps the probabilities and holds an fp32 temporary in softmax's
backward), RMSNorm saving its fp32 input (and four fp32 temporaries in its backward), the 4-bit matmul saving no
activation (it dequantizes the weight again in backward), the 8-bit matmul keeping its input and the LLM.int8()
outlier columns in its ctx where checkpointing cannot drop them, the model's own loss (fp32 logits, 3 fp32
seq x vocab tensors alive in its backward) or the chunked loss (one chunk's logits at a time), what non-reentrant
gradient checkpointing keeps (each layer's input; in CPU memory with offloaded checkpoints) and recomputes (one layer;
with a tiled MLP, one tile), adapter weights in fp32 with casts at their edges as `qadapter_utils.methods.add_adapter`
places them (under autocast: the compute-dtype copies of the adapter's inputs and weights), the optimizer's states
and step temporaries, the cuBLAS workspace and the CUDA caching allocator's rounding. The formulas are shown in
notebooks/07_memory_profiling.ipynb. tests/test_memory.py checks the estimator against every committed GPU
measurement: benchmarks/results/memory_grid_<gpu>.json (benchmarks/memory_grid.py: training through make_trainer and
a plain Trainer, 58 runs within 3.2 %) and memory_<gpu>.json (benchmarks/memory_sweep.py: the own loop, 93 rows
within 3 %), and its activation terms against the tensors autograd saves on the CPU.

How bytes are counted is an input of each estimate, carried in a frozen `_Step` (device="cuda": the caching
allocator's rounding per tensor; "cpu": exact tensor bytes), not module state.

Holds RECIPES, estimate_training_memory, MemoryEstimate, layer_activations, count_adapter_params and
estimate_for_row. Needs quant (weight bytes, dtype sizes); shape names
("llama2-7b") need models and adapter names ("lora") need methods: without them, pass a transformers config and an
adapters config object, or the call raises a ValueError that says so (never adapters' own config of the same
name). Introduced in notebooks/07_memory_profiling.ipynb.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field

import torch

try:  # inside the qadapter_utils package
    from ..quant import DTYPES, weight_memory
except ImportError:  # memory/ copied next to quant.py (the copy-alone rule: qadapter_utils/__init__.py)
    from quant import DTYPES, weight_memory

GiB = 2**30
MiB = 2**20
#: cuBLAS + cuBLASLt workspaces PyTorch allocates (through its caching allocator, so they count in
#: max_memory_allocated) at the first matmul: 32 MiB each on Hopper GPUs (H100/H200), less on older ones.
CUBLAS_WORKSPACE = 64 * MiB

_OPTIMIZERS = (  # the optimizers whose states and step temporaries _optimizer_bytes models
    "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")


def _dtype_bytes(dtype) -> int:
    return _torch_dtype(dtype).itemsize


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use 'bfloat16', 'float16', 'float32' or a torch dtype")
    return DTYPES[dtype]


def _sibling(module: str, name: str, why: str):
    """`name` from the sibling module `module` of qadapter_utils (models or methods: optional for memory/), or a
    ValueError that says what to copy or pass instead when memory/ was copied without it."""
    import importlib

    try:
        return getattr(importlib.import_module(f"..{module}", __package__), name)
    except (ImportError, TypeError):  # no parent package: memory/ copied into another project
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError as err:
            raise ValueError(f"{why}, or copy {module}.py (and what it needs: qadapter_utils/__init__.py) next to "
                             f"memory/") from err


def _resolve_config(config):
    """A transformers config from a config object or a shape name of qadapter_utils.models.SHAPES."""
    if isinstance(config, str):
        name = config.split(":", 1)[1] if config.startswith("random:") else config
        model_config = _sibling("models", "model_config", f"config={config!r}: shape names are models.SHAPES; pass a "
                                f"transformers config (e.g. LlamaConfig(...))")
        return model_config(name)
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if not hasattr(config, k)]
    if missing:
        raise ValueError(f"config lacks {missing}: pass a decoder config such as LlamaConfig / MistralConfig or a "
                         f"shape name like 'llama2-7b'")
    if getattr(config, "model_type", None) not in ("llama", "mistral"):
        warnings.warn(f"the estimator models Llama/Mistral decoders (RMSNorm, SwiGLU MLP, where adapters wraps "
                      f"their layers); {getattr(config, 'model_type', type(config).__name__)!r} may differ",
                      stacklevel=3)
    return config


def _resolve_adapter(adapter):
    """An `adapters` config object from a preset name (qadapter_utils.methods.PRESETS), an adapters config name
    ('seq_bn', 'prefix_tuning', ...), a dict (AdapterConfig.to_dict()) or a config object."""
    from adapters.configuration.adapter_config import AdapterConfig

    if isinstance(adapter, AdapterConfig):
        return adapter
    if isinstance(adapter, str):
        # A name means the preset of methods.PRESETS (notebook 04's LoRA: r=16 on q/v...). Without methods.py, adapters'
        # own config of the same name would differ silently (its "lora": r=8), so names need methods.
        adapter_config = _sibling("methods", "adapter_config", f"adapter={adapter!r}: adapter names are the presets "
                                  f"of methods.PRESETS; pass an adapters config (e.g. adapters.LoRAConfig(r=8))")
        presets = _sibling("methods", "PRESETS", "")
        if adapter.strip().lower().replace("-", "_") in presets:
            return adapter_config(adapter)
    if isinstance(adapter, (str, dict)):
        try:
            return AdapterConfig.load(adapter)
        except Exception as err:
            raise ValueError(f"adapter={adapter!r} is neither a preset of qadapter_utils.methods.PRESETS nor an "
                             f"adapters config name: pass e.g. 'lora', 'lora_all', 'prefix', 'seq_bn', 'par_bn' or "
                             f"adapters.LoRAConfig(r=8)") from err
    raise ValueError(f"adapter must be a preset name or an adapters config object, got {type(adapter).__name__}")


def _components(config) -> list:
    from adapters import ConfigUnion

    return list(config.configs) if isinstance(config, ConfigUnion) else [config]


@dataclass(frozen=True)
class _Shape:
    h: int
    i: int
    L: int
    nh: int
    nkv: int
    hd: int
    V: int
    tied: bool

    @classmethod
    def of(cls, config) -> _Shape:
        nh = config.num_attention_heads
        hd = getattr(config, "head_dim", None) or config.hidden_size // nh
        return cls(h=config.hidden_size, i=config.intermediate_size, L=config.num_hidden_layers, nh=nh,
                   nkv=getattr(config, "num_key_value_heads", None) or nh, hd=hd, V=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))


def _blk(nbytes: float, cuda: bool) -> int:
    """Bytes one tensor of `nbytes` counts for. cuda: what the CUDA caching allocator counts: requests are rounded
    to 512 bytes, and a large one (> 1 MiB) gets a whole block rounded to 2 MiB when the rest would be under 1 MiB
    (the allocator does not split off remainders that small). Else (estimating for the CPU) the exact bytes."""
    nbytes = int(math.ceil(nbytes))
    if nbytes <= 0:
        return 0
    if not cuda:
        return nbytes
    small = -(-nbytes // 512) * 512
    if nbytes <= MiB:
        return small
    large = -(-nbytes // (2 * MiB)) * (2 * MiB)
    return large if large - nbytes < MiB else small


@dataclass(frozen=True)
class _Step:
    """What the sizes of a training step's tensors follow from: the model's shape, the adapter's parts, the batch,
    the bytes per element of the compute dtype (e) and of the adapter weights (ea), the quantization, the
    attention kernel, and how bytes are counted (cuda: the caching allocator's rounding; else exact bytes)."""
    shape: _Shape
    parts: tuple
    b: int
    s: int
    bits: int | None
    e: int
    ea: int
    int8_outliers: float
    eager: bool
    cuda: bool
    autocast: bool = False  # the forward runs under torch.autocast(compute dtype), as Trainer(bf16/fp16=True) does
    casts_suspended: bool = False  # make_trainer under autocast: the adapters' input casts are off
    chunk: int | None = None  # the chunked loss's tokens per chunk; None: the model's own loss (full fp32 logits)
    packed: bool = False  # packed (varlen) attention: q, k, v copied to (tokens, heads, dim), k/v to every head
    tile: int | None = None  # tiled MLP: tokens per tile (each tile checkpointed)
    offload: bool = False  # what the forward saves for backward (layer inputs, the loss's input) waits in CPU memory
    shards: int = 1  # FSDP FULL_SHARD over this many GPUs: the estimate is one GPU's

    @classmethod
    def of(cls, shape: _Shape, parts, *, batch_size: int, seq_len: int, bits, compute_dtype, adapter_dtype,
           int8_outliers: float, attn_implementation: str, cuda: bool, autocast: bool = False,
           **pieces) -> _Step:
        """pieces: the recipe's fields below autocast (casts_suspended, chunk, packed, tile, offload, shards)."""
        return cls(shape=shape, parts=tuple(parts), b=batch_size, s=seq_len, bits=bits,
                   e=_dtype_bytes(compute_dtype),
                   ea=4 if adapter_dtype in (None, "auto") else _dtype_bytes(adapter_dtype),
                   int8_outliers=int8_outliers, eager=attn_implementation == "eager", cuda=cuda, autocast=autocast,
                   **pieces)

    @property
    def T(self) -> int:
        """Tokens in the batch."""
        return self.b * self.s

    @property
    def cast(self) -> bool:
        """Whether the adapter's weights are in another dtype than the compute dtype (casts at their edges)."""
        return self.ea != self.e

    def mask_bytes(self, width: int) -> int:
        """Bytes per element of a dropout mask: CUDA's fused kernel keeps a bool mask; the CPU's keeps the scaled
        noise in the input's dtype (`width` bytes)."""
        return 1 if self.cuda else width

    def blk(self, nbytes: float) -> int:
        """Bytes one tensor of `nbytes` counts for in this estimate (see `_blk`)."""
        return _blk(nbytes, self.cuda)


def _attention(parts, attn_implementation: str | None) -> str:
    """The attention kernel: as given, or as `add_adapter` leaves the model: eager for prefix tuning (adapters
    1.3.0's prefix is wrong under SDPA), SDPA otherwise."""
    from adapters import PrefixTuningConfig

    if attn_implementation is None:
        return "eager" if any(isinstance(p, PrefixTuningConfig) for p in parts) else "sdpa"
    return attn_implementation


def _in_layer(part, layer: int) -> bool:
    return layer not in set(getattr(part, "leave_out", []) or [])


def _lora_targets(part, shape: _Shape) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the linear layers adapters 1.3.0 wraps with this LoRA-type config
    on Llama/Mistral: q/k/v ("selfattn" + attn_matrices), down_proj ("intermediate"), up_proj ("output")."""
    out = []
    if part.selfattn_lora:
        dims = {"q": shape.nh * shape.hd, "k": shape.nkv * shape.hd, "v": shape.nkv * shape.hd}
        out += [(m, shape.h, dims[m]) for m in ("q", "k", "v") if m in part.attn_matrices]
    if part.intermediate_lora:
        out.append(("down", shape.i, shape.h))
    if part.output_lora:
        out.append(("up", shape.h, shape.i))
    return out


def _bn_down(part, shape: _Shape, layer: int) -> int:
    rf = part.reduction_factor
    if isinstance(rf, dict):
        rf = rf.get(str(layer), rf.get("default"))
    return max(1, int(shape.h // rf))


def _bn_locations(part) -> list[str]:
    return [loc for loc in ("mh_adapter", "output_adapter") if part.get(loc, False)]


def count_adapter_params(config, adapter="lora") -> int:
    """The exact number of parameters `adapter` adds to a model of `config` (as adapters 1.3.0 builds it on
    Llama/Mistral), without building the model. LoRA / (IA)^3 / DoRA, prefix tuning (with or without its MLP)
    and bottleneck adapters (sequential, parallel, with layer norms, gating, learned scaling) are counted from
    their formulas; other methods (PHM/Compacter, VeRA, ReFT, invertible adapters) on a meta-device model.
    (07_memory_profiling)"""
    from adapters import BnConfig, LoRAConfig, PrefixTuningConfig

    config = _resolve_config(config)
    adapter = _resolve_adapter(adapter)
    shape = _Shape.of(config)
    total = 0
    for part in _components(adapter):
        if isinstance(part, LoRAConfig) and not _is_vera(part) and part.composition_mode in ("add", "scale"):
            for layer in range(shape.L):
                if not _in_layer(part, layer):
                    continue
                for _, fin, fout in _lora_targets(part, shape):
                    if part.composition_mode == "scale":
                        total += fout * part.r
                    else:
                        total += part.r * (fin + fout) + (fout if part.use_dora else 0)
                    total += (fin + 1) if part.use_gating else 0
        elif isinstance(part, PrefixTuningConfig):  # decoder-only: cross_prefix has no cross-attention to act on
            layers = sum(_in_layer(part, layer) for layer in range(shape.L))
            kv = layers * 2 * shape.nkv * shape.hd
            if part.flat:
                total += part.prefix_length * kv
            else:
                bn = part.bottleneck_size
                total += part.prefix_length * shape.h + (shape.h * bn + bn) + (bn * kv + kv)
            if part.use_gating:
                total += layers * (shape.h + 1) * (1 if part.shared_gating else 2)
        elif isinstance(part, BnConfig) and not part.phm_layer and not part.inv_adapter:
            for layer in range(shape.L):
                if not _in_layer(part, layer):
                    continue
                dn = _bn_down(part, shape, layer)
                per = shape.h * dn + dn + dn * shape.h + shape.h
                per += 2 * shape.h * (int(bool(part.ln_before)) + int(bool(part.ln_after)))
                per += (shape.h + 1) if part.use_gating else 0
                per += {"learned": 1, "channel": shape.h}.get(part.scaling, 0) if isinstance(part.scaling, str) else 0
                total += per * len(_bn_locations(part))
        else:
            total += _count_on_meta(config, part)
    return total


def _is_vera(part) -> bool:
    return isinstance(getattr(part, "vera_d", None), float) or isinstance(getattr(part, "vera_b", None), float)


_CACHE: dict[tuple, object] = {}


def _config_key(config) -> str:
    return json.dumps(config.to_diff_dict(), sort_keys=True, default=str)


def _count_on_meta(config, part) -> int:
    """Trainable parameters of adapter config `part` added to a meta-device model of `config` (no memory)."""
    key = ("meta", _config_key(config), json.dumps(part.to_dict(), sort_keys=True, default=str))
    if key not in _CACHE:
        import adapters
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # also for the layers adapters creates: no memory, no initialisation work
            model = AutoModelForCausalLM.from_config(config)
            adapters.init(model)
            model.add_adapter("count", config=part)
            model.train_adapter("count")
        _CACHE[key] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _CACHE[key]


def _weights(config, bits, quant_type, double_quant, compute_dtype) -> dict:
    """qadapter_utils.quant.weight_memory, cached per config and quantization."""
    dtype = _torch_dtype(compute_dtype)
    key = ("weights", _config_key(config), bits, quant_type, double_quant, str(dtype))
    if key not in _CACHE:
        _CACHE[key] = weight_memory(config, bits=bits, quant_type=quant_type, double_quant=double_quant,
                                    compute_dtype=dtype)
    return _CACHE[key]


def _optimizer_bytes(optimizer: str, tensors: list[int], pbytes: int, blk) -> tuple[int, int, int]:
    """(torch-allocated state bytes, paged state bytes outside the allocator, temporaries during step) for an
    optimizer over trainable tensors of `tensors` elements each, parameters of `pbytes` bytes per element; blk
    counts one tensor's bytes (`_Step.blk`)."""
    if optimizer in ("adamw_torch", "adamw_torch_fused"):  # exp_avg, exp_avg_sq in the parameters' dtype
        states = sum(2 * blk(n * pbytes) for n in tensors)
        # foreach AdamW (the default on CUDA) holds one parameter-sized temporary: sqrt(exp_avg_sq)
        return states, 0, (sum(blk(n * pbytes) for n in tensors) if optimizer == "adamw_torch" else 0)
    if optimizer == "sgd":
        return 0, 0, 0
    if optimizer in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        paged = optimizer.startswith("paged")
        eight = "8bit" in optimizer
        torch_bytes = paged_bytes = 0
        for n in tensors:
            if eight and n >= 4096:  # uint8 states + an fp32 absmax per block of 256 (tensors >= 4096 elements)
                states, absmax = 2 * n, 2 * blk(4 * -(-n // 256))
            else:
                states, absmax = 2 * 4 * n, 0
            if paged and n >= 1e5:  # bitsandbytes pages (cudaMallocManaged) the state buffers of large tensors
                paged_bytes += states
                torch_bytes += absmax
            else:
                torch_bytes += 2 * blk(states // 2) + absmax
        return torch_bytes, paged_bytes, 0
    raise ValueError(f"optimizer={optimizer!r} is not supported: use one of {', '.join(_OPTIMIZERS)}")


def _adapter_tensors(config, adapter, shape: _Shape) -> list[int]:
    """Element counts of the trainable tensors (for the optimizer's per-tensor rules), approximately exact."""
    from adapters import BnConfig, LoRAConfig, PrefixTuningConfig

    out: list[int] = []
    for part in _components(adapter):
        if isinstance(part, LoRAConfig) and not _is_vera(part):
            for layer in range(shape.L):
                if _in_layer(part, layer):
                    for _, fin, fout in _lora_targets(part, shape):
                        out += [fout * part.r] if part.composition_mode == "scale" else [part.r * fin, fout * part.r]
        elif isinstance(part, PrefixTuningConfig) and not part.flat:
            layers = sum(_in_layer(part, layer) for layer in range(shape.L))
            kv = layers * 2 * shape.nkv * shape.hd
            bn = part.bottleneck_size
            out += [part.prefix_length * shape.h, shape.h * bn, bn, bn * kv, kv]
        elif isinstance(part, BnConfig) and not part.phm_layer:
            for layer in range(shape.L):
                if _in_layer(part, layer):
                    dn = _bn_down(part, shape, layer)
                    out += [shape.h * dn, dn, dn * shape.h, shape.h] * len(_bn_locations(part))
        else:
            out.append(_count_on_meta(config, part) if not isinstance(part, PrefixTuningConfig) else
                       count_adapter_params(config, part))
    return out


@dataclass
class MemoryEstimate:
    """What `estimate_training_memory` returns: the bytes of each term at the moment of the peak, their total,
    where the peak happens, and the inputs. (07_memory_profiling)

    terms: quantized weights (+ constants), other weights (embeddings, lm_head, norms), adapter parameters,
    gradients, optimizer states, activations (tensors saved for backward, checkpoints), logits and loss,
    temporaries (dequantized weights, backward buffers, optimizer scratch). total = their sum = the predicted
    `torch.cuda.max_memory_allocated()`. paged_optimizer_states: bitsandbytes paged states, held in unified memory
    outside the PyTorch allocator (not in total; they move to CPU RAM when the GPU is full).
    phases: the total at each candidate moment (end of forward, loss backward, first layer backward, optimizer
    step); peak_at: the largest; phase_terms: the terms at each of those moments."""
    terms: dict[str, int]
    total: int
    peak_at: str
    phases: dict[str, int]
    paged_optimizer_states: int = 0
    adapter_params: int = 0
    inputs: dict = field(default_factory=dict)
    phase_terms: dict = field(default_factory=dict)
    recipe: str = ""

    def __getitem__(self, key: str) -> int:
        return self.terms[key]

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def table(self):
        """The terms as a pandas DataFrame (bytes and GiB), with the total as last row."""
        import pandas as pd

        rows = [{"term": k, "bytes": v, "GiB": v / GiB} for k, v in self.terms.items()]
        rows.append({"term": "total (peak allocated)", "bytes": self.total, "GiB": self.total / GiB})
        if self.paged_optimizer_states:
            rows.append({"term": "paged optimizer states (outside allocator)", "bytes": self.paged_optimizer_states,
                         "GiB": self.paged_optimizer_states / GiB})
        return pd.DataFrame(rows).set_index("term")

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v / GiB:.2f}" for k, v in self.terms.items() if v)
        return f"MemoryEstimate(total={self.total / GiB:.2f} GiB at {self.peak_at}: {parts} GiB; {self.recipe})"


@dataclass
class _Item:
    """One tensor kind a decoder layer keeps for backward."""
    pos: int        # 0 input norm, 1 q/k/v, 2 attention, 3 o_proj, 4 after attention, 5 post-attn norm, 6 MLP,
    #                 7 after MLP
    what: str
    nbytes: int     # allocator bytes (rounded per tensor)
    owned: bool     # created by the adapter (kept even where the hidden state does not require grad yet)
    escapes: bool = False  # kept outside autograd's saved tensors (bitsandbytes int8 ctx): checkpointing can't drop it
    needs_input_grad: bool = False  # kept only once the tensor entering this position requires grad (autocast's
    #                                 copy of an adapter's first weight: autograd keeps it for the input's gradient)


def _layer_items(step: _Step, layer: int) -> list[_Item]:
    """The tensors decoder layer `layer` keeps for backward in transformers 4.57 / adapters 1.3 / bitsandbytes 0.50
    (see the module docstring and the notebook for where each comes from)."""
    from adapters import BnConfig, LoRAConfig, PrefixTuningConfig

    shape, parts, bits, eager, cast = step.shape, step.parts, step.bits, step.eager, step.cast
    T, b, s, e, ea, blk = step.T, step.b, step.s, step.e, step.ea, step.blk
    h, i, hq, hkv = shape.h, shape.i, shape.nh * shape.hd, shape.nkv * shape.hd
    prefix = sum(p.prefix_length for p in parts if isinstance(p, PrefixTuningConfig) and _in_layer(p, layer))
    norm = blk(4 * T * h) + blk(4 * T)  # RMSNorm keeps its input upcast to fp32, and the rsqrt per token
    items = [_Item(0, "input RMSNorm: fp32 input", norm, False)]
    shared_inputs: set[str] = set()
    if bits == 8:  # MatMul8bitLt keeps (in ctx, not save_for_backward) each int8 matmul's input and outliers
        items.append(_Item(1, "int8 matmul input (q/k/v)", blk(e * T * h), False, True))
        items.append(_Item(3, "int8 matmul input (o_proj, a contiguous copy)", blk(e * T * hq), False, True))
        items.append(_Item(6, "int8 matmul inputs (gate/up, down_proj)", blk(e * T * h) + blk(e * T * i),
                           False, True))
        if step.int8_outliers > 0:
            items.append(_Item(6, "int8 outlier columns of down_proj's input",
                               blk(e * T * round(step.int8_outliers * i)), False, True))
        shared_inputs |= {"attn_in", "mlp_in", "down_in"}
    kv = s + prefix
    if eager:  # matmuls keep q, k, v (repeated to all heads) and the probabilities: fp32 softmax output + its copy
        probs = b * shape.nh * s * kv
        items.append(_Item(2, "eager attention: q, v, softmax output (fp32) and its copy",
                           blk(e * T * hq) + blk(e * b * kv * hq) + blk(4 * probs)
                           + (blk(e * probs) if e < 4 else 0), prefix > 0))
        # k is kept only for q's gradient: not where q does not require grad yet (layer 0 with a prefix only)
        items.append(_Item(1, "eager attention: k", blk(e * b * kv * hq), False))
    else:  # SDPA (cuDNN / flash / memory-efficient kernels) keeps q, k, v, the output and the log-sum-exp per row
        if step.packed:  # the varlen kernel gets q, k, v copied to (tokens, heads, dim), k and v to every head
            items.append(_Item(2, "packed attention: q, k, v, output, logsumexp",
                               4 * blk(e * T * hq) + blk(4 * T * shape.nh), False))
        else:
            items.append(_Item(2, "SDPA: q, k, v, output, logsumexp",
                               2 * blk(e * T * hq) + 2 * blk(e * b * kv * hkv) + blk(4 * b * shape.nh * s),
                               prefix > 0))
    items.append(_Item(5, "post-attention RMSNorm: fp32 input", norm, False))
    items.append(_Item(6, "MLP: SiLU input, SiLU output, up_proj output", 3 * blk(e * T * i), False))
    for part in parts:
        if not _in_layer(part, layer):
            continue
        if isinstance(part, LoRAConfig) and not _is_vera(part):
            for name, fin, fout in _lora_targets(part, shape):
                pos = 6 if name in ("up", "down") else 1
                key = {"down": "down_in", "up": "mlp_in"}.get(name, "attn_in")
                if part.composition_mode == "scale":  # (IA)^3: output * vector keeps both (vector per sequence)
                    items.append(_Item(pos, f"(IA)^3 {name}: base output and scaling vector",
                                       blk(e * T * fout) + blk(e * b * fout), True))
                    continue
                if cast and step.autocast:  # fp32 weights under autocast: the matmuls run in the compute dtype
                    if step.casts_suspended:  # make_trainer: the input is the base layer's, in the compute dtype
                        if part.dropout > 0:  # dropout's output (what the matmul keeps) and its mask
                            items.append(_Item(pos, f"LoRA {name}: dropout output", blk(e * T * fin), True))
                            items.append(_Item(pos, f"LoRA {name}: dropout mask (for the input's gradient)",
                                               blk(step.mask_bytes(e) * T * fin), False, needs_input_grad=True))
                        elif key not in shared_inputs:
                            shared_inputs.add(key)
                            items.append(_Item(pos, f"LoRA {name}: input (the base layer's)", blk(e * T * fin),
                                               True))
                    else:  # add_adapter's cast to fp32, then autocast's copy back to the compute dtype
                        if part.dropout > 0:
                            items.append(_Item(pos, f"LoRA {name}: dropout output", blk(ea * T * fin), True))
                            items.append(_Item(pos, f"LoRA {name}: dropout mask (for the input's gradient)",
                                               blk(step.mask_bytes(ea) * T * fin), False, needs_input_grad=True))
                        items.append(_Item(pos, f"LoRA {name}: input, autocast's copy in the compute dtype",
                                           blk(e * T * fin), True))
                    items.append(_Item(pos, f"LoRA {name}: x @ A", blk(e * T * part.r), True))
                    items.append(_Item(pos, f"LoRA {name}: B, autocast's copy", blk(e * fout * part.r), True))
                    items.append(_Item(pos, f"LoRA {name}: A, autocast's copy", blk(e * part.r * fin), False,
                                       needs_input_grad=True))
                    if part.use_gating:  # output * gate keeps the LoRA output
                        items.append(_Item(pos, f"LoRA {name}: gated output", blk(e * T * fout), True))
                    continue
                if part.dropout > 0:
                    items.append(_Item(pos, f"LoRA {name}: dropout output", blk(ea * T * fin), True))
                    items.append(_Item(pos, f"LoRA {name}: dropout mask (for the input's gradient)",
                                       blk(step.mask_bytes(ea) * T * fin), False, needs_input_grad=True))
                elif cast:  # add_adapter's fp32 LoRA: each module casts its input to fp32 and keeps the copy
                    items.append(_Item(pos, f"LoRA {name}: input cast to fp32", blk(ea * T * fin), True))
                elif key not in shared_inputs:
                    shared_inputs.add(key)
                    items.append(_Item(pos, f"LoRA {name}: input", blk(e * T * fin), True))
                items.append(_Item(pos, f"LoRA {name}: x @ A", blk(ea * T * part.r), True))
                if part.use_gating:  # output * gate keeps the LoRA output
                    items.append(_Item(pos, f"LoRA {name}: gated output", blk(ea * T * fout), True))
        elif isinstance(part, BnConfig):
            for loc in _bn_locations(part):
                pos = 4 if loc == "mh_adapter" else 7
                dn = _bn_down(part, shape, layer)
                act = 1 if part.non_linearity.lower() in ("relu", "tanh", "sigmoid") else 2
                n_h = 1 + int(bool(part.ln_before)) + int(bool(part.ln_after))
                width = ea if cast else e
                if cast and step.autocast:  # the linears run in the compute dtype (layer norms stay in fp32)
                    items.append(_Item(pos, f"bottleneck {loc}: input, autocast's copy (+ fp32 layer norm inputs)",
                                       blk(e * T * h) + (n_h - 1) * blk(ea * T * h), True))
                    items.append(_Item(pos, f"bottleneck {loc}: activation", act * blk(e * T * dn), True))
                    items.append(_Item(pos, f"bottleneck {loc}: up weight, autocast's copy", blk(e * h * dn), True))
                    items.append(_Item(pos, f"bottleneck {loc}: down weight, autocast's copy", blk(e * dn * h),
                                       False, needs_input_grad=True))
                    width = e
                else:
                    items.append(_Item(pos, f"bottleneck {loc}: input (+ layer norms)", n_h * blk(width * T * h),
                                       True))
                    items.append(_Item(pos, f"bottleneck {loc}: activation", act * blk(width * T * dn), True))
                if part.use_gating:  # output * gate keeps the adapter output
                    items.append(_Item(pos, f"bottleneck {loc}: gated output", blk(width * T * h), True))
    if step.tile and T > step.tile:  # tiled MLP: each tile checkpointed; the layer keeps only the tiles' input
        per_tile = [it for it in items if it.pos == 6 and not it.escapes]  # (bitsandbytes' ctx escapes the tiles too)
        items = [it for it in items if not (it.pos == 6 and not it.escapes)]
        items.append(_Item(6, "tiled MLP: the tiles' input (the post-attention norm's output)", blk(e * T * h),
                           any(it.owned for it in per_tile)))
    return items


def _layers(step: _Step, input_requires_grad: bool) -> list[list[_Item]]:
    """Per layer, the items it keeps. Before the first adapter, where the hidden state does not require grad
    (no gradient checkpointing: nothing makes the embedding output require grad), only adapter-owned tensors
    are kept."""
    out = []
    flowing = input_requires_grad
    for layer in range(step.shape.L):
        items = _layer_items(step, layer)
        if not flowing:
            owned = [it for it in items if it.owned]
            first = min((it.pos for it in owned), default=None)
            items = [it for it in items if it.owned or (first is not None and (
                it.pos > first or (it.pos == first and not it.needs_input_grad)))]
            flowing = first is not None
        out.append(items)
    return out


#: The training recipes the estimator models (`estimate_training_memory(recipe=...)`); each answer names its own.
RECIPES = {
    "make_trainer": "qadapter_utils.train.make_trainer on a CUDA GPU: the Trainer's autocast mixed precision without "
                    "the adapters' input casts, packed batches with packed (varlen) attention (eager attention for "
                    "prefix tuning), the chunked loss, paged AdamW 8-bit, gradient checkpointing",
    "plain": "a Trainer / AdapterTrainer as users run it without make_trainer: autocast mixed precision with "
             "add_adapter's casts at the adapters' edges, padded batches, SDPA (eager for prefix tuning), the "
             "model's own loss (full fp32 logits), the Trainer's default AdamW (fused)",
}
#: Each recipe's defaults for the arguments left at None.
_RECIPE_DEFAULTS = {
    "make_trainer": dict(optimizer="paged_adamw_8bit", autocast=True, chunked_loss=True, packed_attention=True),
    "plain": dict(optimizer="adamw_torch_fused", autocast=True, chunked_loss=False, packed_attention=False),
}


def _recipe(recipe: str, parts, *, optimizer, autocast, chunked_loss, chunk_size, packed_attention,
            attn_implementation, tiled_mlp, offload_checkpoints, compute_dtype) -> dict:
    """The settings a recipe runs with: its defaults for what was left at None, checked."""
    from adapters import PrefixTuningConfig

    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: use 'make_trainer' (what qadapter_utils.train.make_trainer runs on a "
                         f"GPU) or 'plain' (a Trainer with bf16/fp16=True, padded batches, the model's own loss)")
    defaults = _RECIPE_DEFAULTS[recipe]
    prefix = any(isinstance(p, PrefixTuningConfig) for p in parts)
    out = dict(optimizer=defaults["optimizer"] if optimizer is None else optimizer,
               autocast=defaults["autocast"] if autocast is None else autocast,
               chunked_loss=defaults["chunked_loss"] if chunked_loss is None else chunked_loss,
               packed_attention=(defaults["packed_attention"] and not prefix and attn_implementation is None)
               if packed_attention is None else packed_attention,
               tiled_mlp=tiled_mlp, offload_checkpoints=offload_checkpoints)
    if _torch_dtype(compute_dtype) == torch.float32:
        out["autocast"] = False  # full precision: the Trainer runs no autocast
    for key in ("autocast", "chunked_loss", "packed_attention", "offload_checkpoints"):
        if not isinstance(out[key], bool):
            raise ValueError(f"{key}={out[key]!r}: use True or False (or None for the recipe's default)")
    if out["packed_attention"] and prefix:
        raise ValueError("packed_attention=True with prefix tuning: make_trainer refuses it (adapters 1.3.0 computes "
                         "prefix tuning right only under eager attention); leave packed_attention=None")
    if out["packed_attention"] and attn_implementation not in (None, "sdpa"):
        raise ValueError(f"packed_attention=True replaces attn_implementation={attn_implementation!r}: pass one")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r}: tokens per chunk of the chunked loss, e.g. 2048")
    if tiled_mlp is not None and not (isinstance(tiled_mlp, int) and tiled_mlp >= 1):
        raise ValueError(f"tiled_mlp={tiled_mlp!r}: tokens per MLP tile (e.g. 4096) or None")
    return out


def estimate_training_memory(config="llama2-7b", *, bits: int | None = 4, quant_type: str = "nf4",
                             double_quant: bool = True, compute_dtype="bfloat16", adapter="lora",
                             adapter_dtype="auto", batch_size: int = 1, seq_len: int = 512,
                             gradient_checkpointing: bool = True, recipe: str = "make_trainer",
                             optimizer: str | None = None, autocast: bool | None = None,
                             chunked_loss: bool | None = None, chunk_size: int = 2048,
                             packed_attention: bool | None = None, tiled_mlp: int | None = None,
                             offload_checkpoints: bool = False, shards: int = 1, int8_outliers: float = 1.0,
                             input_requires_grad: bool | None = None, attn_implementation: str | None = None,
                             device: str = "cuda") -> MemoryEstimate:
    """Predict the peak `torch.cuda.max_memory_allocated()` of training `adapter` on a `bits`-quantized model
    of `config` with batches of `batch_size` x `seq_len` tokens; no GPU and no weights needed. The answer names
    the recipe it assumed (`MemoryEstimate.recipe`).

    recipe: "make_trainer" (default): what qadapter_utils.train.make_trainer runs on a CUDA GPU: the Trainer's
    autocast in the compute dtype with the adapters' input casts suspended, packed batches (batch_size samples of
    seq_len tokens in one row) under packed (varlen) attention (eager attention for prefix tuning), the chunked
    loss (chunk_size tokens at a time), paged AdamW 8-bit, gradient checkpointing. "plain": a Trainer /
    AdapterTrainer with bf16=True / fp16=True as users run it without make_trainer: autocast with add_adapter's
    casts at the adapters' edges, padded batches of batch_size x seq_len, SDPA, the model's own loss (full fp32
    logits), the Trainer's default optimizer (adamw_torch_fused). Each piece is also an argument (None = the
    recipe's): optimizer, autocast (False: no mixed precision, add_adapter's casts only, as
    memory.measure_training_memory's own loop runs), chunked_loss, packed_attention, and the fast recipe's
    tiled_mlp (tokens per MLP tile) and offload_checkpoints (make_trainer's switches of the same names).
    shards: FSDP FULL_SHARD over this many GPUs (scripts/train_distributed.py --fsdp with
    configs/accelerate/fsdp_qlora.yaml), batch_size per GPU: the estimate is one GPU's peak. Modeled from how FSDP
    shards and gathers; not yet checked against a measurement (issue #17).
    config: a transformers config or a shape name of qadapter_utils.models.SHAPES ("llama2-7b", "llama2-13b", ...).
    bits: 4 (NF4/FP4, double_quant), 8 (LLM.int8()) or None (unquantized, in compute_dtype).
    adapter: a preset name of qadapter_utils.methods.PRESETS ("lora", "lora_all", "prefix", "seq_bn", "par_bn",
    ...) or an adapters config object. adapter_dtype: "auto" = fp32 adapter weights with casts at their edges,
    as `qadapter_utils.methods.add_adapter` places them; or the compute dtype (no casts).
    optimizer: adamw_torch (foreach), adamw_torch_fused, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit, sgd.
    int8_outliers (8-bit only): share of down_proj's input columns holding an LLM.int8() outlier (|x| > 6) in a
    batch, which bitsandbytes keeps again for backward. 1.0 (default) is an upper bound and what random weights
    give from ~1k tokens on; real Llama-2 weights have far fewer outlier columns.
    input_requires_grad: whether the embedding output requires grad; None = as `add_adapter` leaves it (only with
    gradient checkpointing). True when e.g. peft's prepare_model_for_kbit_training or an earlier
    `enable_input_require_grads()` made it so: then layer 0 also keeps its activations.
    attn_implementation: "sdpa" or "eager" where packed attention is off; None = as `add_adapter` leaves the
    model: eager for prefix tuning (adapters 1.3.0's prefix is wrong under SDPA), SDPA otherwise. Eager attention
    keeps the seq x (seq+prefix) probabilities of every head (fp32 and a copy) for backward: it grows with the
    square of the sequence.
    device: "cuda" (allocator rounding to 512 B / 2 MiB blocks and 64 MiB of cuBLAS workspace, as on Hopper
    GPUs) or "cpu" (exact tensor bytes, for comparing with the CPU measure of `measure_training_memory`).
    Checked against GPU peaks measured through make_trainer and a Trainer (benchmarks/memory_grid.py) and in the
    own loop without autocast (benchmarks/memory_sweep.py): tests/test_memory.py. Returns a MemoryEstimate whose
    terms sum to the predicted peak; the formulas are in notebooks/07_memory_profiling.ipynb. Assumes no padding
    inside a batch, loss on every position, outputs dropped before backward. (05_training, 07_memory_profiling)"""
    if bits not in (None, 4, 8):
        raise ValueError(f"bits={bits!r}: use 4, 8 or None")
    if not (isinstance(batch_size, int) and isinstance(seq_len, int)) or batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size!r}, seq_len={seq_len!r}: both must be integers >= 1")
    if optimizer is not None and optimizer not in _OPTIMIZERS and optimizer != "adamw_bnb_8bit":
        raise ValueError(f"optimizer={optimizer!r} is not supported: use one of {', '.join(_OPTIMIZERS)}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: use 'cuda' or 'cpu'")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards={shards!r}: the number of GPUs FSDP shards the model over (1: no sharding)")
    config = _resolve_config(config)
    adapter_obj = _resolve_adapter(adapter)
    parts = _components(adapter_obj)
    settings = _recipe(recipe, parts, optimizer=optimizer, autocast=autocast, chunked_loss=chunked_loss,
                       chunk_size=chunk_size, packed_attention=packed_attention,
                       attn_implementation=attn_implementation, tiled_mlp=tiled_mlp,
                       offload_checkpoints=offload_checkpoints, compute_dtype=compute_dtype)
    if settings["autocast"]:
        _check_autocast_modeled(parts, bits)
    attn_implementation = "packed" if settings["packed_attention"] else _attention(parts, attn_implementation)
    if attn_implementation not in ("sdpa", "eager", "packed"):
        raise ValueError(f"attn_implementation={attn_implementation!r}: use 'sdpa' or 'eager'")
    rows, length = (1, batch_size * seq_len) if recipe == "make_trainer" else (batch_size, seq_len)  # packing
    step = _Step.of(_Shape.of(config), parts, batch_size=rows, seq_len=length, bits=bits,
                    compute_dtype=compute_dtype, adapter_dtype=adapter_dtype, int8_outliers=int8_outliers,
                    attn_implementation=attn_implementation, cuda=device == "cuda", autocast=settings["autocast"],
                    casts_suspended=recipe == "make_trainer" and settings["autocast"],
                    chunk=chunk_size if settings["chunked_loss"] else None,
                    packed=settings["packed_attention"], tile=tiled_mlp,
                    offload=offload_checkpoints and gradient_checkpointing, shards=shards)
    inputs = dict(config=getattr(config, "name_or_path", "") or type(config).__name__, bits=bits,
                  quant_type=quant_type, double_quant=double_quant, compute_dtype=str(compute_dtype),
                  adapter=adapter if isinstance(adapter, str) else type(adapter_obj).__name__,
                  adapter_dtype=str(adapter_dtype), batch_size=batch_size, seq_len=seq_len,
                  gradient_checkpointing=gradient_checkpointing, recipe=recipe, **settings,
                  chunk_size=chunk_size, attn_implementation=attn_implementation, shards=shards)
    estimate = _estimate(step, config, adapter_obj, quant_type=quant_type, double_quant=double_quant,
                         compute_dtype=compute_dtype, gradient_checkpointing=gradient_checkpointing,
                         optimizer=settings["optimizer"],
                         input_requires_grad=gradient_checkpointing if input_requires_grad is None
                         else input_requires_grad, inputs=inputs)
    estimate.recipe = _recipe_name(inputs)
    return estimate


def _recipe_name(inputs: dict) -> str:
    """A short description of the recipe an estimate assumed, e.g. "make_trainer (autocast bfloat16, packed
    attention, chunked loss, paged_adamw_8bit, gradient checkpointing)"."""
    pieces = [f"autocast {inputs['compute_dtype'].replace('torch.', '')}" if inputs["autocast"] else "no autocast",
              {"packed": "packed attention", "eager": "eager attention", "sdpa": "SDPA"}[inputs["attn_implementation"]],
              f"chunked loss ({inputs['chunk_size']})" if inputs["chunked_loss"] else "full logits",
              inputs["optimizer"],
              "gradient checkpointing" if inputs["gradient_checkpointing"] else "no checkpointing"]
    if inputs["tiled_mlp"]:
        pieces.append(f"MLP tiles of {inputs['tiled_mlp']}")
    if inputs["offload_checkpoints"]:
        pieces.append("offloaded checkpoints")
    if inputs["shards"] > 1:
        pieces.append(f"FSDP over {inputs['shards']} GPUs, per GPU")
    return f"{inputs['recipe']} ({', '.join(pieces)})"


def _check_autocast_modeled(parts, bits) -> None:
    """Raise ValueError for what autocast=True does not model yet."""
    from adapters import BnConfig, LoRAConfig, PrefixTuningConfig

    for part in parts:
        lora = isinstance(part, LoRAConfig) and not _is_vera(part)
        bottleneck = isinstance(part, BnConfig) and not part.phm_layer and not part.inv_adapter
        if not (lora or bottleneck or isinstance(part, PrefixTuningConfig)):
            raise ValueError(f"autocast=True is modeled for LoRA-type methods, bottleneck adapters and prefix "
                             f"tuning, not for {type(part).__name__}: estimate without mixed precision "
                             f"(recipe='plain', autocast=False), or measure")


def _estimate(step: _Step, config, adapter_obj, *, quant_type: str, double_quant: bool, compute_dtype,
              gradient_checkpointing: bool, optimizer: str, input_requires_grad: bool,
              inputs: dict) -> MemoryEstimate:
    """The bytes of each term at each moment a peak can happen, for the step's sizes (`step`), the model's weights
    (`config` quantized with quant_type / double_quant, other weights in compute_dtype) and the adapter
    (`adapter_obj`, an adapters config) trained with `optimizer`; `inputs` is recorded in the MemoryEstimate."""
    from adapters import PrefixTuningConfig

    shape, parts, bits, blk = step.shape, step.parts, step.bits, step.blk
    b, s, e, ea = step.b, step.s, step.e, step.ea
    T, V, h, i = step.T, shape.V, shape.h, shape.i
    cuda_workspace = CUBLAS_WORKSPACE if step.cuda else 0

    # --- what stays for the whole step: weights, adapter, optimizer states, cuBLAS workspace ------------------
    weights = _weights(config, bits, quant_type, double_quant, compute_dtype)
    quantized = weights["quantized_weights"] + weights["constants"] + weights["code_tables"]
    other = weights["other_weights"] + weights["buffers"]
    n_adapter = count_adapter_params(config, adapter_obj)
    tensors = _adapter_tensors(config, adapter_obj, shape)
    adapter_bytes = sum(blk(n * ea) for n in tensors)
    opt_states, paged, opt_temp = _optimizer_bytes(optimizer, tensors, ea, blk)
    if step.shards > 1:
        # FSDP FULL_SHARD: each GPU holds 1/shards of every parameter, of its gradient and of its optimizer state;
        # bitsandbytes' quantization constants live in quant_state, outside the parameters: whole on every GPU.
        # While computing, FSDP gathers whole units: the root (embeddings, lm_head, final norm) from the start of
        # the forward to the end of the backward, one decoder layer and, with backward prefetch, the next one.
        # Modeled from how FSDP 1 runs accelerate's configs/accelerate/fsdp_qlora.yaml; not yet measured (#17).
        n, packed = step.shards, weights["quantized_weights"]
        quantized = -(-packed // n) + 2 * -(-packed // shape.L) + weights["constants"] + weights["code_tables"]
        other = -(-weights["other_weights"] // n) + weights["other_weights"] + weights["buffers"]
        adapter_bytes, opt_states, paged, opt_temp = (-(-x // n) for x in (adapter_bytes, opt_states, paged, opt_temp))

    # --- activations kept for backward ------------------------------------------------------------------------
    eager = step.eager
    layers = _layers(step, input_requires_grad)
    size = [sum(it.nbytes for it in items) for items in layers]
    escaping = [sum(it.nbytes for it in items if it.escapes) for items in layers]
    recomputed = [sz - esc for sz, esc in zip(size, escaping)]  # what one layer's recomputation adds back
    final_norm = blk(4 * T * h) + blk(4 * T)
    rope = 2 * blk(e * s * shape.hd)  # cos / sin, shared by all layers
    pool_saved = pool_out = 0  # prefix tuning: its MLP's saved tensors; its output, held by the forward context
    for p in (p for p in parts if isinstance(p, PrefixTuningConfig)):
        n_layers = sum(_in_layer(p, layer) for layer in range(shape.L))
        pool_out += blk(e * b * p.prefix_length * n_layers * 2 * shape.nkv * shape.hd)
        if p.flat:
            continue
        if step.autocast and step.cast:  # the MLP's linears run in the compute dtype: their inputs and autocast's
            kv_all = n_layers * 2 * shape.nkv * shape.hd  # copies of both weights are kept
            pool_saved += (blk(e * b * p.prefix_length * h) + blk(e * b * p.prefix_length * p.bottleneck_size)
                           + blk(e * h * p.bottleneck_size) + blk(e * p.bottleneck_size * kv_all))
        else:
            pool_saved += blk(ea * b * p.prefix_length * h) + blk(ea * b * p.prefix_length * p.bottleneck_size)
    # with checkpointing the recomputation needs the prefixes, so the context (and the output) lives into backward
    pool = pool_saved + (pool_out if gradient_checkpointing else 0)
    hidden = blk(e * T * h)
    if gradient_checkpointing:  # non-reentrant: each layer keeps its input (+ what escapes autograd's hooks)
        layer_kept = [(0 if step.offload else hidden) + esc for esc in escaping]
    else:
        layer_kept = size
    if step.offload:  # the saved layer inputs and the final norm's input wait in CPU memory: one comes back at a time
        final_norm = 0
    unpacked = hidden if step.offload else 0
    kept = sum(layer_kept) + final_norm + rope + pool

    # --- logits and loss: bf16 logits, their fp32 copy (ForCausalLMLoss upcasts), log-softmax output ----------
    if step.chunk:  # qadapter_utils.loss: the decoder's output, the copy of the counted positions it keeps, and per
        c = min(step.chunk, T)  # chunk the logits (compute dtype, fp32) and logsumexp's two fp32 temporaries;
        # backward: the kept copy, the input gradient it fills, a chunk's logits (both dtypes), softmax, its scaled
        # fp32 copy and the compute-dtype cast
        loss_forward = 2 * hidden + max(blk(e * c * V) + blk(4 * c * V), 3 * blk(4 * c * V))
        loss_backward = 2 * hidden + max(blk(e * c * V) + 2 * blk(4 * c * V), 2 * blk(4 * c * V) + blk(e * c * V))
    else:
        logits = blk(e * T * V)
        fp32_logits = blk(4 * T * V)
        loss_forward = logits + (fp32_logits if e < 4 else 0) + fp32_logits
        loss_backward = 3 * fp32_logits  # log-softmax output + nll_loss's gradient + log-softmax's input gradient

    # --- a layer's backward: the gradient arriving (T x h) and, in the MLP, the gradients of SiLU's and up_proj's
    # outputs beside their product's, or the weight dequantized for the matmul's input gradient
    w_tmp = (blk(e * h * i) + (blk(4 * (h * i // 64)) if bits == 4 else 0)) if bits in (4, 8) else 0
    tiled = bool(step.tile) and T > step.tile
    Tm = step.tile if tiled else T  # tokens the MLP runs at once
    layer_tmp = hidden + max(blk(e * Tm * i) + w_tmp, 3 * blk(e * Tm * i))
    if tiled:  # a tile's recomputed MLP tensors, and its input gradient scattered into a (tokens x hidden) zero
        tile_step = dataclasses.replace(step, b=1, s=step.tile, tile=None)
        layer_tmp += sum(it.nbytes for it in _layer_items(tile_step, shape.L - 1) if it.pos == 6 and not it.escapes)
        layer_tmp += 2 * hidden
    # the post-attention RMSNorm's backward (after the MLP's, whose tensors are released by then): the gradient
    # arriving through the residual, its product with the weight and four fp32 (tokens x hidden) temporaries.
    # Matters where the MLP's share is small (tiled MLP)
    mlp_kept = sum(it.nbytes for it in _layer_items(step, shape.L - 1) if it.pos == 6 and not it.escapes)
    layer_tmp = max(layer_tmp, 2 * hidden + 4 * blk(4 * T * h) - mlp_kept)
    mask = 0
    attn_fwd_tmp = 0
    if eager:
        # eager attention's backward: the probabilities' gradient (bf16, then fp32) and softmax's input gradient,
        # when the layer's MLP tensors are already released; its forward: the masked scores before softmax and
        # the prefix-extended mask; and transformers materialises a (seq x seq) causal mask for eager attention
        kv = s + sum(p.prefix_length for p in parts if isinstance(p, PrefixTuningConfig))
        probs = b * shape.nh * s * kv
        # (in the compute dtype: the saved copy is released first, softmax's backward holds an fp32 temporary
        # beside the fp32 gradient and its output: measured on an H200, benchmarks/results/memory_grid_h200.md)
        probs_tmp = 3 * blk(4 * probs) - blk(e * probs) if e < 4 else blk(4 * probs) + 2 * blk(e * probs)
        attn_tmp = hidden + probs_tmp - 3 * blk(e * T * i) - final_norm
        layer_tmp = max(layer_tmp, attn_tmp)
        attn_fwd_tmp = 2 * blk(e * probs) + blk(e * b * s * kv)
        mask = blk(e * b * s * s)
        if gradient_checkpointing:  # an input of every checkpointed layer: kept until backward ends
            kept += mask
    # --- the last layer's forward MLP (matters for 8-bit without checkpointing): LLM.int8()'s mixed matmul of
    # down_proj holds an fp16 copy of its input, the int8 codes, the outlier weight columns dequantized (int8,
    # fp32, fp16) and an int32 product beside the output
    if bits == 8:
        n_out = round(step.int8_outliers * i)
        fwd_tmp = blk(2 * T * i) + blk(T * i) + blk(h * n_out) + blk(4 * h * n_out) + blk(2 * h * n_out) \
            + blk(4 * T * h) + hidden
    elif bits == 4:
        fwd_tmp = blk(e * Tm * i) + (w_tmp if Tm > 1536 else 0) + hidden  # product, dequantized weight, output
    else:
        fwd_tmp = blk(e * Tm * i) + hidden
    fwd_tmp = max(fwd_tmp, attn_fwd_tmp) + (0 if gradient_checkpointing else mask)
    grads_all = adapter_bytes
    grads_layer = adapter_bytes // shape.L
    embedding_leaf = hidden if input_requires_grad else 0  # made to require grad: AccumulateGrad keeps it
    if step.offload:  # the embedding output's copy goes to the CPU, but its AccumulateGrad node keeps it here
        kept += embedding_leaf

    static = {"quantized weights": quantized, "other weights": other, "adapter parameters": adapter_bytes,
              "optimizer states": opt_states}

    def phase(grads, activations, logit_bytes, temporaries):
        return dict(static, **{"gradients": grads, "activations": activations, "logits and loss": logit_bytes,
                               "temporaries": temporaries, "cuBLAS workspace": cuda_workspace})

    candidates = {
        "end of forward (loss)": phase(0, kept + (0 if gradient_checkpointing else pool_out), loss_forward, 0),
        "loss backward": phase(0, kept, loss_backward, 0),
        "first layer backward": phase(grads_layer, kept - final_norm + unpacked
                                      + (recomputed[-1] if gradient_checkpointing else 0), 0, layer_tmp),
        "last layer backward": phase(grads_all, layer_kept[0] + unpacked
                                     + (recomputed[0] if gradient_checkpointing else 0)
                                     + (embedding_leaf if step.offload or not gradient_checkpointing else 0)
                                     + rope + pool, 0,
                                     layer_tmp),
        "optimizer step": phase(grads_all, 0, 0, opt_temp),
    }
    if not gradient_checkpointing:
        kept += embedding_leaf  # without checkpointing the embedding output is no layer's input copy
        for name in ("end of forward (loss)", "loss backward", "first layer backward"):
            candidates[name]["activations"] += embedding_leaf
        candidates["last layer forward (MLP)"] = phase(0, kept - final_norm + (0 if embedding_leaf else hidden)
                                                       + pool_out, 0, fwd_tmp)
    phases = {k: sum(v.values()) for k, v in candidates.items()}
    peak_at = max(phases, key=phases.get)
    return MemoryEstimate(terms=candidates[peak_at], total=phases[peak_at], peak_at=peak_at, phases=phases,
                          paged_optimizer_states=paged, adapter_params=n_adapter, inputs=inputs,
                          phase_terms=candidates)


def layer_activations(config="llama2-7b", *, bits: int | None = 4, compute_dtype="bfloat16", adapter="lora",
                      adapter_dtype="auto", batch_size: int = 1, seq_len: int = 512,
                      attn_implementation: str | None = None, int8_outliers: float = 1.0, autocast: bool = False):
    """What one (middle) decoder layer keeps for backward, as the estimator counts it: a pandas DataFrame with one
    row per tensor kind (where in the layer, bytes, bytes per token, whether gradient checkpointing drops it).
    Exact tensor bytes (no allocator rounding). (07_memory_profiling)"""
    import pandas as pd

    config = _resolve_config(config)
    parts = _components(_resolve_adapter(adapter))
    if autocast:
        _check_autocast_modeled(parts, bits)
    shape = _Shape.of(config)
    step = _Step.of(shape, parts, batch_size=batch_size, seq_len=seq_len, bits=bits, compute_dtype=compute_dtype,
                    adapter_dtype=adapter_dtype, int8_outliers=int8_outliers,
                    attn_implementation=_attention(parts, attn_implementation), cuda=False, autocast=autocast)
    items = _layer_items(step, shape.L // 2)
    where = {0: "input norm", 1: "q/k/v", 2: "attention", 3: "o_proj", 4: "after attention", 5: "post-attn norm",
             6: "MLP", 7: "after MLP"}
    rows = [{"where": where[it.pos], "tensor": it.what, "bytes": it.nbytes,
             "bytes/token": it.nbytes / (batch_size * seq_len),
             "kept with checkpointing": "yes (bitsandbytes ctx)" if it.escapes else "no, recomputed"}
            for it in sorted(items, key=lambda it: it.pos)]
    frame = pd.DataFrame(rows)
    total = {"where": "", "tensor": "total per layer", "bytes": frame["bytes"].sum(),
             "bytes/token": frame["bytes/token"].sum(), "kept with checkpointing": ""}
    return pd.concat([frame, pd.DataFrame([total])], ignore_index=True)


def estimate_for_row(row: dict) -> int:
    """The estimate (bytes) for one row of a table written by benchmarks/memory_grid.py (rows naming their recipe
    and its switches) or benchmarks/memory_sweep.py (the own loop without autocast: recipe "plain",
    autocast=False)."""
    overrides = row.get("overrides", {})
    keys = ("input_requires_grad", "attn_implementation", "autocast", "chunked_loss", "chunk_size",
            "packed_attention", "tiled_mlp", "offload_checkpoints")
    extra = {k: row[k] for k in keys if row.get(k) is not None}
    if "recipe" not in row:
        extra.setdefault("autocast", False)
    if extra.get("packed_attention"):
        extra.pop("attn_implementation", None)
    return estimate_training_memory(
        row["model"], bits=row["bits"], quant_type=row.get("quant_type", "nf4"),
        double_quant=row.get("double_quant", True), compute_dtype=row.get("compute_dtype", "bfloat16"),
        adapter=row["adapter_config"], adapter_dtype=overrides.get("adapter_dtype", "auto"),
        batch_size=row["batch_size"], seq_len=row["seq_len"], gradient_checkpointing=row["gradient_checkpointing"],
        optimizer=row["optimizer"], recipe=row.get("recipe", "plain"), **extra).total
