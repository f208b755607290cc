"""Adapter methods on a (quantized) Llama: presets, `add_adapter`, `load_adapter` and `trainable_summary`.

    model, tok = qadapter_utils.load_model("tiny", bits=4)
    name = add_adapter(model, "lora")             # QLoRA default: r=16, alpha=32 on q and v
    name = add_adapter(model, "seq_bn", reduction_factor=8)
    trainable_summary(model)

Built on AdapterHub `adapters` 1.3.0: the configs are its own classes, `add_adapter` calls its `init`, `add_adapter`,
`train_adapter` and `adapter_to`. What this module adds is what people trip over on a quantized base: adapter
weights kept in fp32 while the base computes in bf16/fp16 (casting at the adapter's edge), gradient checkpointing
with a frozen embedding, and clear errors, raised before `adapters` fails deep inside, for what does not work on
a quantized base in adapters 1.3.0 (see `_check_supported`).

What it refuses, before anything of the model changes: adapter names that are also a component of a module path
("weight", "q_proj", "lora_A": adapters matches names against every component and would treat base weights as the
adapter's), out-of-range sizes (r, alpha, dropout, reduction_factor, prefix_length), saving over saved work, loading
over an adapter of the same name, and adapter files that are truncated, hold non-finite values or do not match
their config.

Introduced in notebooks/04_adapters_on_quantized.ipynb. Needs guards (error types, folder checks) and weights
(keep_4bit_layers_trainable, logical_numel).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import adapters
import torch
from adapters import (
    CompacterConfig,
    CompacterPlusPlusConfig,
    ConfigUnion,
    DiReftConfig,
    DoRAConfig,
    DoubleSeqBnConfig,
    IA3Config,
    LoRAConfig,
    LoReftConfig,
    MAMConfig,
    NoReftConfig,
    ParBnConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SeqBnConfig,
    SeqBnInvConfig,
    UniPELTConfig,
    VeraConfig,
)
from adapters.configuration.adapter_config import AdapterConfig, BnConfig

try:  # inside the qadapter_utils package
    from .guards import IntegrityError, UsageError, check_number, folder_written_atomically
    from .weights import keep_4bit_layers_trainable, logical_numel
except ImportError:  # copied next to its siblings (the copy-alone rule: qadapter_utils/__init__.py)
    from guards import IntegrityError, UsageError, check_number, folder_written_atomically
    from weights import keep_4bit_layers_trainable, logical_numel

# Preset name -> (factory of a fresh adapters config, one line: what it is and where it attaches on Llama/Mistral).
# Where adapters 1.3.0 wraps Llama's linear layers: LoRA-type methods can target q_proj, k_proj, v_proj
# ("selfattn", chosen by attn_matrices), down_proj ("intermediate_lora") and up_proj ("output_lora");
# o_proj and gate_proj are not adaptable in adapters 1.3.0.
_PRESETS: dict[str, tuple[Callable[[], AdapterConfig], str]] = {
    "lora": (lambda: LoRAConfig(r=16, alpha=32),
             "LoRA r=16, alpha=32 on q_proj and v_proj (the QLoRA-on-attention default of our benchmarks)"),
    "lora_all": (lambda: LoRAConfig(r=16, alpha=32, attn_matrices=["q", "k", "v"], intermediate_lora=True,
                                    output_lora=True),
                 "LoRA r=16, alpha=32 on the 5 of Llama's 7 linear layers per block that adapters 1.3.0 can wrap: "
                 "q, k, v, up_proj, down_proj (not o_proj and gate_proj, which it cannot reach)"),
    "dora": (lambda: DoRAConfig(r=16, alpha=16),
             "DoRA (LoRA + learned per-row magnitude) r=16 on q_proj and v_proj; unquantized base only. alpha = r "
             "because adapters 1.3.0 normalises by ||W + BA|| while adding (alpha/r)·BA: equal only when alpha = r"),
    "ia3": (lambda: IA3Config(),
            "(IA)^3: learned vectors scaling the outputs of k_proj, v_proj and down_proj (adapters maps "
            "'intermediate' to down_proj; the (IA)^3 paper scales the feed-forward's inner activation, i.e. "
            "down_proj's input, instead)"),
    "vera": (lambda: VeraConfig(),
             "VeRA: frozen random low-rank matrices shared by all layers, on q_proj, v_proj; adapters 1.3.0 trains "
             "its scaling 'vectors' as full (out x out and r x r) diagonal-initialised matrices"),
    "prefix": (lambda: PrefixTuningConfig(),
               "prefix tuning: 30 trained key/value vectors prepended in every attention layer (through an MLP "
               "with bottleneck 512 during training)"),
    "prefix_flat": (lambda: PrefixTuningConfig(flat=True),
                    "prefix tuning without the reparametrising MLP: 30 key/value vectors per layer trained directly"),
    "seq_bn": (lambda: SeqBnConfig(),
               "sequential bottleneck adapter (Pfeiffer): a down/up MLP (hidden/16) after each layer's MLP block"),
    "double_seq_bn": (lambda: DoubleSeqBnConfig(),
                      "two sequential bottleneck adapters (Houlsby): after attention and after the MLP, hidden/16"),
    "par_bn": (lambda: ParBnConfig(),
               "parallel bottleneck adapter (He et al.): a down/up MLP (hidden/2, scaled x4) beside each MLP block"),
    "seq_bn_inv": (lambda: SeqBnInvConfig(),
                   "seq_bn plus an invertible (NICE) adapter on the token embeddings"),
    "compacter": (lambda: CompacterConfig(),
                  "Compacter: double_seq_bn with Kronecker-factored (PHM) projections, hidden/32"),
    "compacter++": (lambda: CompacterPlusPlusConfig(),
                    "Compacter++: seq_bn with Kronecker-factored (PHM) projections, hidden/32"),
    "mam": (lambda: MAMConfig(),
            "Mix-and-Match: prefix tuning (bottleneck 800) in attention + par_bn beside the MLP"),
    "unipelt": (lambda: UniPELTConfig(),
                "UniPELT: gated prefix tuning (10 tokens) + gated seq_bn (hidden/16) + gated LoRA (r=8) on q, v"),
    "loreft": (lambda: LoReftConfig(dropout=0.0),
               "LoReFT: rank-1 orthogonal intervention on each layer's output at the first 3 positions (dropout 0; "
               "adapters' default 0.05 makes 3-step loss checks noisy)"),
    "noreft": (lambda: NoReftConfig(dropout=0.0),
               "NoReFT: LoReFT without the orthogonality constraint"),
    "direft": (lambda: DiReftConfig(dropout=0.0),
               "DiReFT: NoReFT without subtracting the projection"),
    "prompt_tuning": (lambda: PromptTuningConfig(),
                      "prompt tuning: 10 trained input embeddings; NOT supported on Llama/Mistral by adapters 1.3.0"),
}

#: preset name -> factory returning a fresh `adapters` config. (04_adapters_on_quantized)
PRESETS: dict[str, Callable[[], AdapterConfig]] = {name: factory for name, (factory, _) in _PRESETS.items()}
#: preset name -> one-line description (what it is, where it attaches). (04_adapters_on_quantized)
DESCRIPTIONS: dict[str, str] = {name: text for name, (_, text) in _PRESETS.items()}


class AdapterMethodError(UsageError):
    """Raised (before `adapters` fails deep inside) with a message saying what to use instead."""


#: Module and parameter names `adapters` 1.3.0 creates inside a model: an adapter may not be named like them.
ADAPTERS_INTERNAL_NAMES = frozenset({
    "F", "G", "W_left", "W_right", "adapter_down", "adapter_fusion_layer", "adapter_up", "adapters",
    "attention_adapters", "b", "base", "bias", "control_trans", "dropout", "f", "gate", "invertible_adapters",
    "learned_source", "lora_A", "lora_B", "loras", "non_linearity", "original", "output_adapters", "parametrizations",
    "phm_rule", "pool", "prefix_gates", "prefix_tuning", "prefix_tunings", "projection", "reft_layer", "refts",
    "self_prefix", "shared_parameters", "units", "vera_B", "vera_D", "wte", "weight", "heads", "adapter_fusion_layers",
})


def adapter_config(method: str | AdapterConfig, **overrides) -> AdapterConfig:
    """An `adapters` config object for `method` (a preset name from PRESETS or any adapters config object),
    with `overrides` applied through `.replace(**overrides)`. For a union (mam, unipelt) each override goes to the
    components that have that field. (04_adapters_on_quantized)"""
    if isinstance(method, str):
        key = method.strip().lower().replace("-", "_")
        if key not in PRESETS:
            raise AdapterMethodError(
                f"unknown adapter method {method!r}. Presets: {', '.join(PRESETS)}; or pass any `adapters` config "
                f"object, e.g. adapters.LoRAConfig(r=8)")
        config = PRESETS[key]()
    elif isinstance(method, AdapterConfig):
        config = method
    else:
        raise AdapterMethodError(f"method must be a preset name ({', '.join(PRESETS)}) or an `adapters` config "
                                 f"object, got {type(method).__name__}")
    config = _apply_overrides(config, overrides) if overrides else config
    check_config_values(config)
    return config


def check_config_values(config: AdapterConfig) -> None:
    """Raise AdapterMethodError for sizes adapters 1.3.0 would fail on deep inside (ZeroDivisionError, TypeError)
    or accept and then train nothing: r, alpha, dropout, reduction_factor, prefix_length, bottleneck_size.
    (04_adapters_on_quantized)"""
    try:
        for part in _components(config):
            _check_part(part)
    except UsageError as err:
        raise AdapterMethodError(str(err)) from None


def _check_part(part: AdapterConfig) -> None:
    name = type(part).__name__
    if isinstance(part, LoRAConfig):
        check_number(f"{name} r", part.r, low=1, integer=True, hint="the rank of the update, e.g. r=8")
        check_number(f"{name} alpha", part.alpha, low=0, low_open=True,
                     hint="the update is scaled by alpha/r; alpha=0 would train nothing. Use e.g. alpha=2*r")
    if isinstance(part, BnConfig):
        factors = part.reduction_factor
        for layer, factor in (factors.items() if isinstance(factors, dict) else [("", factors)]):
            check_number(f"{name} reduction_factor{f'[{layer!r}]' if layer else ''}", factor, low=0, low_open=True,
                         hint="hidden size / bottleneck size, e.g. 16")
    if isinstance(part, PrefixTuningConfig):
        check_number(f"{name} prefix_length", part.prefix_length, low=1, integer=True,
                     hint="the number of trained key/value positions, e.g. 30; 0 would train nothing")
        check_number(f"{name} bottleneck_size", part.bottleneck_size, low=1, integer=True, hint="e.g. 512")
    if hasattr(part, "r") and not isinstance(part, LoRAConfig):  # ReFT: the intervention's rank
        check_number(f"{name} r", part.r, low=1, integer=True, hint="e.g. r=1")
    if hasattr(part, "dropout"):
        check_number(f"{name} dropout", part.dropout, low=0, high=1, high_open=True,
                     hint="a probability, e.g. 0.0 or 0.05")


def _fields(config: AdapterConfig) -> set[str]:
    return {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()


def _apply_overrides(config: AdapterConfig, overrides: dict) -> AdapterConfig:
    if isinstance(config, ConfigUnion):
        known = set().union(*(_fields(c) for c in config.configs))
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise AdapterMethodError(
                f"{type(config).__name__} has no field {', '.join(map(repr, unknown))}; its components "
                f"({', '.join(type(c).__name__ for c in config.configs)}) accept: {', '.join(sorted(known))}")
        parts = [c.replace(**{k: v for k, v in overrides.items() if k in _fields(c)}) for c in config.configs]
        union = ConfigUnion(*parts)
        return union
    known = _fields(config)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise AdapterMethodError(
            f"{type(config).__name__} has no field {', '.join(map(repr, unknown))}; valid fields: "
            f"{', '.join(sorted(known))}")
    return config.replace(**overrides)


def _components(config: AdapterConfig) -> list[AdapterConfig]:
    return list(config.configs) if isinstance(config, ConfigUnion) else [config]


def is_quantized(model) -> str | None:
    """'4bit', '8bit' or None: whether `model` holds bitsandbytes-quantized linear layers."""
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError:  # bitsandbytes missing: nothing can be quantized
        return None
    for module in model.modules():
        if isinstance(module, Linear4bit):
            return "4bit"
        if isinstance(module, Linear8bitLt):
            return "8bit"
    return None


def _check_supported(model, config: AdapterConfig) -> None:
    """Raise AdapterMethodError for the combinations adapters 1.3.0 cannot run, naming what works instead."""
    arch = type(model).__name__
    quant = is_quantized(model)
    for part in _components(config):
        if isinstance(part, PromptTuningConfig):
            base = getattr(model, "base_model", model)
            if not getattr(base, "support_prompt_tuning", True) or "llama" in arch.lower() or \
                    "mistral" in arch.lower():
                raise AdapterMethodError(
                    f"prompt tuning is not supported on {arch} by adapters 1.3.0 (its Llama/Mistral integration "
                    f"has no prompt-tuning hook). Use 'prefix' (trained key/value vectors in every attention layer, "
                    f"the closest method) or 'loreft' (interventions at the first positions) instead.")
        if isinstance(part, LoRAConfig) and part.use_dora and quant:
            raise AdapterMethodError(
                f"DoRA (use_dora=True) does not work on {quant[0]}-bit quantized weights in adapters 1.3.0: its "
                f"magnitude vector needs the norm of the full-precision weight, and adapters takes the norm of the "
                f"packed integer weight (`linalg.vector_norm ... Got Byte/Char`). Use 'lora' (QLoRA) or 'lora_all' "
                f"on the quantized base, or DoRA on an unquantized (bits=None) model.")
        if isinstance(part, BnConfig) and part.stochastic_depth > 0:
            import importlib.util

            if importlib.util.find_spec("torchvision") is None:
                raise AdapterMethodError(
                    f"stochastic_depth={part.stochastic_depth} needs torchvision, which is not installed: pass "
                    f"stochastic_depth=0.0, or `pip install torchvision`.")
        if isinstance(part, LoRAConfig) and (isinstance(part.vera_d, float) or isinstance(part.vera_b, float)):
            shapes = _lora_target_shapes(model, part)
            if len(shapes) > 1:
                raise AdapterMethodError(
                    f"VeRA shares one pair of frozen random matrices across all the layers it adapts, so they must "
                    f"all have one shape; on this {arch} they have {len(shapes)} ({', '.join(map(str, shapes))}"
                    f"{'; grouped-query attention makes k/v smaller than q' if _is_gqa(model) else ''}) and "
                    f"adapters 1.3.0 fails. Use VeRA on same-shaped layers only (e.g. attn_matrices=['q']), or "
                    f"'lora' instead.")
        if type(part).__name__ == "MTLLoRAConfig":
            raise AdapterMethodError("MTL-LoRA needs task ids in every forward pass, which qadapter's training "
                                     "does not provide: use 'lora' (one adapter per task) instead.")


def _is_gqa(model) -> bool:
    config = model.config
    return getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)


def _lora_target_shapes(model, config: LoRAConfig) -> list[tuple[int, int]]:
    """The distinct (out, in) shapes of the linear layers a LoRA-type config adapts (Llama-style names)."""
    names = [f"{m}_proj" for m in config.attn_matrices if m in ("q", "k", "v")] if config.selfattn_lora else []
    names += ["down_proj"] if config.intermediate_lora else []
    names += ["up_proj"] if config.output_lora else []
    shapes = []
    for path, module in model.named_modules():
        if path.split(".")[-1] in names and hasattr(module, "in_features"):
            shape = (module.out_features, module.in_features)
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in: that of its (never quantized) input embeddings. load_model loads the
    non-quantized parts in the compute dtype (fp32 on the CPU, bf16/fp16 on GPUs)."""
    return model.get_input_embeddings().weight.dtype


def _adapter_modules(model, name: str) -> list[torch.nn.Module]:
    """The modules holding adapter `name`'s weights (each once)."""
    seen, out = set(), []
    todo = [module for per_layer in model.get_adapter(name).values() for module in per_layer.values()]
    while todo:
        module = todo.pop(0)
        if isinstance(module, torch.nn.ModuleList):  # several locations of one layer (e.g. LoRA on q and v)
            todo[:0] = list(module)
        elif isinstance(module, torch.nn.ModuleDict):  # containers are never called: hook what they hold
            todo[:0] = list(module.values())
        elif id(module) not in seen:
            seen.add(id(module))
            out.append(module)
    return out


def _adapter_parameters(model, name: str) -> dict[str, torch.nn.Parameter]:
    """Parameter path -> parameter of adapter `name`: every parameter whose path has `name` as one component
    (adapters stores each adapter under its name in a ModuleDict; this also finds the prefix-tuning pool)."""
    out = {}
    for path, param in model.named_parameters(remove_duplicate=True):
        if name in path.split("."):
            out[path] = param
    return out


def _cast_tree(value, dtype):
    if torch.is_tensor(value) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cast_tree(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_tree(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_tree(v, dtype) for k, v in value.items()}
    return value


def _first_float_dtype(args, kwargs):
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.is_floating_point():
            return value.dtype
    return None


def _install_cast_hooks(module: torch.nn.Module, param_dtype: torch.dtype, model_dtype: torch.dtype,
                        cast_inputs: bool = True) -> None:
    """Cast floating inputs of `module` to `param_dtype` and its floating outputs back to the caller's dtype
    (or to `model_dtype` when it got no floating input, e.g. a prefix pool). Removes earlier hooks first.
    cast_inputs=False keeps the output cast only (cast_hooks_suspended)."""
    for handle in getattr(module, "_qadapter_cast_hooks", ()):
        handle.remove()
    module._qadapter_cast_dtypes, module._qadapter_casts_inputs = (param_dtype, model_dtype), cast_inputs
    if param_dtype == model_dtype:
        module._qadapter_cast_hooks = ()
        return

    def pre(mod, args, kwargs):
        mod._qadapter_caller_dtype = _first_float_dtype(args, kwargs) or model_dtype
        if cast_inputs:
            return _cast_tree(args, param_dtype), _cast_tree(kwargs, param_dtype)
        return None

    def post(mod, args, kwargs, output):
        return _cast_tree(output, getattr(mod, "_qadapter_caller_dtype", model_dtype))

    module._qadapter_cast_hooks = (module.register_forward_pre_hook(pre, with_kwargs=True),
                                   module.register_forward_hook(post, with_kwargs=True))


def _has_input_casts(module) -> bool:
    return bool(getattr(module, "_qadapter_cast_hooks", ())) and module._qadapter_casts_inputs


@contextlib.contextmanager
def cast_hooks_suspended(model):
    """Without the input casts add_adapter puts at the adapters' edges (fp32 adapter weights in a 16-bit model) for
    the duration; the output casts (back to the caller's dtype) stay, and everything is as before afterwards, also
    after an error. Yields the number of adapter modules changed.

    Under autocast (what `Trainer(bf16=True)` / `fp16=True` runs) the input casts are a round trip that changes
    nothing: autocast turns the fp32 copy of each input straight back into bf16/fp16 for the matmul (loss and
    every gradient bit-identical with and without them: tests/test_methods.py). They cost an fp32 copy of each
    adapted layer's input and two passes over it, so make_trainer suspends them while it trains in mixed
    precision. The output casts keep what an adapter hands back in the model's dtype (an (IA)^3 scaling vector in
    fp32 would otherwise turn the keys into fp32). Outside autocast the input casts are needed: a bf16 input into
    fp32 weights raises a dtype error. (05_training)"""
    changed = [m for m in model.modules() if _has_input_casts(m)]
    for module in changed:
        _install_cast_hooks(module, *module._qadapter_cast_dtypes, cast_inputs=False)
    try:
        yield len(changed)
    finally:
        for module in changed:
            _install_cast_hooks(module, *module._qadapter_cast_dtypes)


def _weight_dtype(adapter_dtype, auto: torch.dtype) -> torch.dtype:
    """The dtype of trainable adapter or fusion weights: `auto` for adapter_dtype="auto" (or None), else the torch
    dtype given."""
    if adapter_dtype in (None, "auto"):
        return auto
    if isinstance(adapter_dtype, torch.dtype):
        return adapter_dtype
    raise AdapterMethodError(f"adapter_dtype={adapter_dtype!r}: use 'auto' (fp32 weights) or a torch dtype")


def _place(model, name: str, adapter_dtype) -> torch.dtype:
    """Put adapter `name` on the model's device in the chosen dtype; return that dtype."""
    model_dtype = compute_dtype(model)
    config = model.adapters_config.match(name, LoRAConfig) if hasattr(model, "adapters_config") else None
    # fp32 master weights; DoRA reads the base weight directly inside the layer, so it has to match it
    dtype = _weight_dtype(adapter_dtype, model_dtype if (config is not None and config.use_dora) else torch.float32)
    device = model.get_input_embeddings().weight.device
    model.adapter_to(name, device=device, dtype=dtype)
    for param in _adapter_parameters(model, name).values():  # what adapter_to does not reach (prefix pool)
        if param.dtype != dtype or param.device != device:
            param.data = param.data.to(device=device, dtype=dtype)
    # One memory layout for the adapter's tensors, so that a saved and reloaded adapter computes bit-identically
    # (loading copies into the existing layout; LoReFT's orthogonal parametrization keeps a transposed buffer).
    for path, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in path.split(".") and not tensor.is_contiguous():
            tensor.data = tensor.data.contiguous()
    modules = _adapter_modules(model, name)
    prefix_pool = getattr(getattr(model, "base_model", model), "prefix_tuning", None)
    if prefix_pool is not None and hasattr(prefix_pool, "prefix_tunings") and name in prefix_pool.prefix_tunings:
        modules.append(prefix_pool.prefix_tunings[name])
    covered = {id(m) for module in modules for m in module.modules()}
    for path, module in model.named_modules():  # e.g. UniPELT's prefix gates, called outside the adapter modules
        if (name in path.split(".") and id(module) not in covered
                and any(True for _ in module.parameters(recurse=False))):
            modules.append(module)
            covered.update(id(m) for m in module.modules())
    for module in modules:
        _install_cast_hooks(module, dtype, model_dtype)
    return dtype


def add_adapter(model, method: str | AdapterConfig, name: str | None = None, *, adapter_dtype="auto",
                gradient_checkpointing: bool | None = None, **overrides) -> str:
    """Add an adapter to `model` (quantized or not), activate it and set it to train; return its name.

    method: a preset name (see PRESETS / DESCRIPTIONS) or any `adapters` config; overrides are applied to it
    (`add_adapter(model, "lora", r=8)`). name defaults to the preset name (or the config class's name).
    What it does beyond `model.add_adapter`: `adapters.init(model)` when needed; `train_adapter` (freezes the base,
    activates the adapter, model.train()); adapter weights on the model's device in fp32 (adapter_dtype="auto"):
    optimizer updates below ~0.4% of a weight vanish in bf16 and the fp16 GradScaler refuses fp16 weights, while
    the adapter is <1% of the parameters, so fp32 costs little; when the base computes in bf16/fp16, activations
    are cast to fp32 at the adapter's input and back at its output (as peft's autocast_adapter_dtype does). DoRA
    stays in the compute dtype (it reads the base weight). gradient_checkpointing: True turns it on (non-reentrant);
    when it is on, the input embeddings' output is made to require grad so a frozen embedding does not cut the
    graph. Prefix tuning (alone or inside MAM / UniPELT) switches the model to eager attention: under SDPA,
    adapters 1.3.0 masks its own prefix out. Raises AdapterMethodError early for what adapters 1.3.0 cannot do
    here. (04_adapters_on_quantized)
    """
    config = adapter_config(method, **overrides)
    if name is None:
        name = method.strip().lower().replace("-", "_") if isinstance(method, str) else type(config).__name__
        name = re.sub(r"[^\w]", "_", name)
    check_adapter_name(model, name)
    _check_supported(model, config)
    if name in getattr(model, "adapters_config", ()):
        raise AdapterMethodError(f"the model already has an adapter named {name!r}: pass another name=..., or "
                                 f"remove it first with model.delete_adapter({name!r})")
    _init(model)
    if any(isinstance(part, PrefixTuningConfig) for part in _components(config)):
        _prefix_needs_eager_attention(model)
    # a model on the meta device (shapes only, e.g. to count parameters) gets meta adapter weights: initialising
    # real ones first would cost minutes for some methods on a 7B shape (LoReFT's orthogonal matrices)
    on_meta = model.get_input_embeddings().weight.device.type == "meta"
    try:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model.add_adapter(name, config=config)
        model.train_adapter(name)
        model.train()  # train_adapter sets only the inner model to train mode; the Trainer and checks read the top
        _place(model, name, adapter_dtype)
    except Exception:  # adapters failed midway: leave no half-added adapter registered under the name
        if name in model.adapters_config:
            model.delete_adapter(name)
        raise
    _gradient_checkpointing(model, gradient_checkpointing)
    _keep_trainable(model)
    return name


def add_fusion(model, *adapter_names: str, adapter_dtype="auto", **config_overrides):
    """AdapterFusion over adapters already trained on `model`; return the `Fuse` composition, active and set to
    train. What it does beyond adapters' `add_adapter_fusion(Fuse(*names))` + `train_adapter_fusion(...)` (which
    freeze the base and the adapters; only the fusion layers train): the fusion layers go to the model's device in
    fp32 (adapter_dtype="auto") with their inputs cast to fp32 and outputs back, as add_adapter does for adapters
    (the fp16 gradient scaler refuses fp16 weights; in the compute dtype a T4 run fails at its first step), and
    the model is put in train mode; layers where none of the fused adapters sits (their leave_out) get no fusion
    layer. config_overrides go to adapters' `AdapterFusionConfig.load("dynamic", ...)`, e.g. temperature=True.
    (06_merging_and_fusion)"""
    from adapters import AdapterFusionConfig
    from adapters.composition import Fuse

    missing = [n for n in adapter_names if n not in getattr(model, "adapters_config", ())]
    if len(adapter_names) < 2 or missing:
        raise AdapterMethodError(f"AdapterFusion combines two or more adapters already on the model; "
                                 f"{'missing: ' + ', '.join(map(repr, missing)) if missing else 'got fewer than two'}"
                                 f" (add and train them first with add_adapter)")
    dtype = _weight_dtype(adapter_dtype, torch.float32)  # checked before the model changes
    fusion = Fuse(*adapter_names)
    # adapters 1.3.0 puts a fusion layer into every layer, also where none of the fused adapters sits (leave_out):
    # it never runs there but would be trained, with optimizer state (3 x hidden² weights each: 50M on a 7B), and
    # creating one costs time (0.6 s on a CPU for a 7B's: 17 s for the 28 layers notebook 06 leaves out). Skip them.
    skipped = [m for m in model.modules() if hasattr(m, "add_fusion_layer") and hasattr(m, "adapter_fusion_layer")
               and not set(adapter_names) & set(getattr(m, "adapters", {}))]
    for module in skipped:
        module.add_fusion_layer = lambda names: None  # an instance attribute over the class's method, removed below
    try:
        model.add_adapter_fusion(fusion, config=AdapterFusionConfig.load("dynamic", **config_overrides))
    finally:
        for module in skipped:
            del module.add_fusion_layer
    model.train_adapter_fusion(fusion)
    model.train()
    model.adapter_fusion_to(fusion, device=model.get_input_embeddings().weight.device, dtype=dtype)
    model_dtype = compute_dtype(model)
    for path, module in model.named_modules():
        if path.endswith(f"adapter_fusion_layer.{fusion.name}"):
            _install_cast_hooks(module, dtype, model_dtype)
    return fusion


def _keep_trainable(model) -> None:
    """An eval-mode forward before the adapter was added (an evaluation, a generate) may have repacked 4-bit layers
    for inference on AVX512-BF16 CPUs, which cuts their gradient and computes in another kernel: undo and prevent
    that (weights.py explains), so that a trained adapter and the same adapter loaded later compute alike."""
    if is_quantized(model) == "4bit":
        keep_4bit_layers_trainable(model)


def check_adapter_name(model, name) -> None:
    """Raise AdapterMethodError unless `name` can name an adapter of `model`: letters, digits, '_' or '-', and
    not a component of any module or parameter path of the model nor a name adapters uses inside it ("weight",
    "bias", "q_proj", "lora_A", ...): adapters 1.3.0 matches an adapter's name against every path component, so
    such a name would make it treat the base's own weights as the adapter's. (04_adapters_on_quantized)"""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w\-]*", name):
        raise AdapterMethodError(f"adapter name {name!r} is not usable: use letters, digits, '_' or '-' (no dots), "
                                 f"starting with a letter, e.g. 'my_lora'")
    adapters_now = set(getattr(getattr(model, "adapters_config", None), "adapters", {}) or {})
    taken = ADAPTERS_INTERNAL_NAMES | {part for path, _ in model.named_modules() for part in path.split(".")}
    taken |= {part for path, _ in model.named_parameters() for part in path.split(".")}
    if name in taken - adapters_now:
        raise AdapterMethodError(f"adapter name {name!r} is also the name of a module or weight inside the model "
                                 f"(e.g. {_path_with(model, name)}); adapters would treat those as the adapter's "
                                 f"and break the base model. Pick a name that names the task, e.g. "
                                 f"'{name}_adapter' or 'my_task'.")


def _path_with(model, name: str) -> str:
    for path, _ in [*model.named_parameters(), *model.named_modules()]:
        if name in path.split("."):
            return path
    return f"adapters' internal {name!r}"


def _prefix_needs_eager_attention(model) -> None:
    """adapters 1.3.0 prefix tuning under transformers 4.57's SDPA attention is silently wrong: with a 4D boolean
    mask (padding, use_cache=False, gradient checkpointing) the prefix positions are masked out, so the prefix
    gets no gradient and changes nothing; without a mask the causal alignment is off. Eager attention is right
    (tests/test_methods.py checks both). Switch to it, and say so."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != "eager":
        import warnings

        warnings.warn(f"prefix tuning: switching attention from {implementation!r} to 'eager', because adapters "
                      f"1.3.0's prefix tuning is silently ignored under SDPA attention", stacklevel=3)
        model.set_attn_implementation("eager")


def _init(model) -> None:
    """adapters.init(model) once, keeping the model's train/eval mode: adapters 1.3.0 swaps in new wrapper
    modules (LoRALinear8bitLt, ...) in train mode even when the model is in eval mode, which changes outputs
    (dropout; on the CPU bitsandbytes runs 8-bit layers in train mode through a different, dequantizing kernel).
    It runs on the meta device: adapters' wrappers build a full-size, randomly initialised weight for every linear
    layer and then replace it by the model's own, which for Llama-2-7B is 45 s of wasted CPU work at every load."""
    if hasattr(model, "adapters_config"):
        return
    training = model.training
    with torch.device("meta"):
        adapters.init(model)
    model.train(training)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta and not all(p.is_meta for p in model.parameters()):  # (a model built on meta stays there)
        raise RuntimeError(f"adapters.init left tensors on the meta device: {on_meta[:3]}")
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(_pass_kv_cache, with_kwargs=True)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (`model.model.layers`), also through a peft wrapper
    (`get_base_model()`); [] when the model has none. (05_training; qadapter_utils.fast uses it)"""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    return list(getattr(getattr(model, "model", None), "layers", []))


def _pass_kv_cache(module, args, kwargs):
    """adapters 1.3.0's decoder layers read `past_key_value`, transformers 4.57 passes `past_key_values`, so the
    KV cache is silently dropped and cached generation goes wrong after adapters.init (adapter-hub/adapters#824).
    Hand the cache over under the name the layer reads."""
    if "past_key_values" in kwargs and kwargs.get("past_key_value") is None:
        kwargs["past_key_value"] = kwargs.pop("past_key_values")
    return args, kwargs


def _gradient_checkpointing(model, enable: bool | None) -> None:
    if enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif enable is False and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
        remove_input_require_grads_hooks(model)
    if getattr(model, "is_gradient_checkpointing", False) and not hasattr(model, "_require_grads_hook"):
        model.enable_input_require_grads()


def remove_input_require_grads_hooks(model) -> None:
    """Remove every input-grad hook of the embeddings. adapters registers an enable_input_require_grads hook at
    every gradient_checkpointing_enable call and keeps only the last handle; left in place after checkpointing is
    turned off, they make the embedding output require grad, so layer 0 keeps activations it need not (measured
    on the GPU in benchmarks/results/memory_*.md)."""
    embedding = model.get_input_embeddings()
    for key, hook in list(embedding._forward_hooks.items()):
        if getattr(hook, "__name__", "") == "make_inputs_require_grads":
            del embedding._forward_hooks[key]
    if hasattr(model, "_require_grads_hook"):
        del model._require_grads_hook


def save_adapter(model, name: str, directory: str | Path, overwrite: bool = False) -> Path:
    """Save adapter `name` alone (its config and weights as safetensors, not the base's lm_head) to `directory`;
    return the folder. The files are written into a sibling folder that is renamed into place at the end, so a
    kill mid-save never leaves a half-written adapter. A non-empty `directory` raises guards.SavedWorkError
    (nothing written) unless overwrite=True, which replaces it when it holds only saved work.
    (04_adapters_on_quantized)"""
    import adapters.loading

    if name not in getattr(model, "adapters_config", ()):
        have = list(getattr(getattr(model, "adapters_config", None), "adapters", {}) or [])
        raise AdapterMethodError(f"the model has no adapter {name!r}; it has {have}: pass one of those names")
    with folder_written_atomically(directory, overwrite=overwrite) as tmp:
        original = adapters.loading.save_file
        adapters.loading.save_file = _save_file_once_per_tensor  # prefix tuning shares one pool across layers
        try:
            model.save_adapter(str(tmp), name, use_safetensors=True, **without_head(model.save_adapter))
        finally:
            adapters.loading.save_file = original
    return Path(directory).expanduser()


def without_head(method) -> dict:
    """{"with_head": False} where the adapters method takes it: on a causal LM adapters 1.3.0 otherwise saves the
    frozen lm_head of the base ("model_head.safetensors", 262 MB for Llama-2-7B in fp16) with every adapter, and
    loads it back over the model's own."""
    import inspect

    return {"with_head": False} if "with_head" in inspect.signature(method).parameters else {}


def _save_file_once_per_tensor(tensors: dict, filename: str, metadata=None) -> None:
    """safetensors' save_file, keeping the first name of tensors that share memory. adapters 1.3.0 refuses to
    save prefix tuning with use_safetensors=True because every layer's state dict names the same shared prefix
    pool; one copy suffices, since loading it fills the shared parameters every name points to."""
    from safetensors.torch import save_file

    unique, seen = {}, set()
    for key, tensor in tensors.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if ident not in seen:
            seen.add(ident)
            unique[key] = tensor.contiguous()
    save_file(unique, filename, metadata)


def load_adapter(model, directory: str | Path, name: str | None = None, train: bool = False,
                 adapter_dtype="auto", overwrite: bool = False) -> str:
    """Load an adapter saved by `save_adapter` into `model` (calls `adapters.init` when needed), activate it,
    place it like add_adapter does and return its name; train=True also sets it to train.

    Checked before the model changes: the config is readable and its sizes valid, the name is usable, the weights
    file is complete and every value finite (guards.IntegrityError naming the file otherwise); an adapter of the
    same name already in the model is refused unless overwrite=True. Checked while loading: every tensor the
    config implies is in the file and the file holds no other (a config naming another architecture or other
    target matrices); on a mismatch the adapter is removed again and IntegrityError raised.
    (04_adapters_on_quantized)"""
    directory = Path(directory)
    config_file = directory / "adapter_config.json"
    if not config_file.exists():
        raise AdapterMethodError(f"{directory.name!r} holds no adapter_config.json: pass the folder written by "
                                 f"save_adapter(model, name, folder)")
    saved, config = _read_adapter_config(config_file)
    name = name if name is not None else saved.get("name")
    check_adapter_name(model, name)
    replacing = name in getattr(model, "adapters_config", ())
    if replacing and not overwrite:
        raise AdapterMethodError(f"the model already has an adapter named {name!r}; loading would replace its "
                                 f"weights. Pass name='other_name' to load it beside, or overwrite=True to replace.")
    _check_supported(model, config)
    read_adapter_weights(directory)
    _init(model)
    if any(isinstance(part, PrefixTuningConfig) for part in _components(config)):
        _prefix_needs_eager_attention(model)
    training = model.training
    if replacing:  # prove the files load cleanly beside the old adapter before removing it
        probe = f"{name}_qadapter_check"
        _load_checked(model, directory, probe)
        model.delete_adapter(probe)
        model.delete_adapter(name)
    _load_checked(model, directory, name)
    model.set_active_adapters(name)
    _keep_trainable(model)  # also for inference: computes as the model the adapter was trained on did
    if train:
        model.train_adapter(name)
        model.train()
    else:
        model.train(training)  # new adapter modules are created in train mode: follow the model's mode
    _place(model, name, adapter_dtype)
    return name


def _read_adapter_config(config_file: Path) -> tuple[dict, AdapterConfig]:
    import json

    try:
        saved = json.loads(config_file.read_text())
        config = AdapterConfig.load(saved["config"])
    except Exception as err:
        raise IntegrityError(f"{config_file.parent.name}/{config_file.name} is not a readable adapter config "
                             f"({type(err).__name__}: {err}): save the adapter again with save_adapter") from None
    try:
        check_config_values(config)
    except AdapterMethodError as err:
        raise IntegrityError(f"{config_file.parent.name}/{config_file.name}: {err}") from None
    return saved, config


#: Weight files save_adapter and the Trainer's checkpoints write, in the order adapters reads them.
ADAPTER_WEIGHT_FILES = ("adapter.safetensors", "pytorch_adapter.bin")


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter (adapter.safetensors, else pytorch_adapter.bin), checked: the file exists
    and is complete, and every value is finite. Raises guards.IntegrityError naming the file.
    (04_adapters_on_quantized)"""
    directory = Path(directory)
    file = next((directory / f for f in ADAPTER_WEIGHT_FILES if (directory / f).exists()), None)
    where = lambda f: f"{directory.name}/{f}"  # noqa: E731
    if file is None:
        raise IntegrityError(f"{directory.name!r} holds no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)}): "
                             f"the save was interrupted or the folder is not an adapter; save it again")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(file), device="cpu")
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise IntegrityError(f"{where(file.name)} cannot be read ({type(err).__name__}: {err}); it is probably "
                             f"truncated by an interrupted save or copy: save the adapter again") from None
    bad = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise IntegrityError(f"{where(file.name)} holds non-finite values (NaN or inf) in {len(bad)} tensors "
                             f"(e.g. {bad[0]}): the training that wrote it diverged; lower the learning rate "
                             f"and train again, or load an earlier checkpoint")
    return tensors


def _load_checked(model, directory: Path, name: str) -> None:
    """model.load_adapter(directory, load_as=name), then compare what adapters reports: every tensor of the new
    adapter must come from the file and every tensor of the file must land in the adapter; else remove it."""
    info: dict = {}
    model.load_adapter(str(directory), load_as=name, set_active=False, use_safetensors=True, loading_info=info,
                       **without_head(model.load_adapter))
    missing = _really_missing(model, info.get("missing_keys", []))
    unexpected = list(info.get("unexpected_keys", []))
    if missing or unexpected:
        model.delete_adapter(name)
        what = ([f"{len(missing)} tensors the config implies are not in the file (e.g. {missing[0]})"] if missing
                else []) + ([f"{len(unexpected)} tensors of the file fit nowhere (e.g. {unexpected[0]})"]
                            if unexpected else [])
        raise IntegrityError(f"{directory.name}/adapter_config.json does not match the saved weights: "
                             f"{'; '.join(what)}. The config was edited or the files come from different saves: "
                             f"save the adapter again. Nothing was loaded.")


def _really_missing(model, missing: list[str]) -> list[str]:
    """Missing keys less those sharing storage with a loaded one (save_adapter stores a shared prefix pool
    once, under its first name)."""
    if not missing:
        return []
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", "") + "."

    def storage(key):
        return named.get(key, named.get(key[len(prefix):] if key.startswith(prefix) else prefix + key))

    counts: dict[int, int] = {}
    for tensor in named.values():
        counts[tensor.untyped_storage().data_ptr()] = counts.get(tensor.untyped_storage().data_ptr(), 0) + 1
    out = []
    for key in missing:
        tensor = storage(key)
        if tensor is None or counts.get(tensor.untyped_storage().data_ptr(), 0) < 2:
            out.append(key)
    return out


def trainable_summary(model, verbose: bool = False):
    """A pandas DataFrame: one row per adapter (architecture, parameters, trainable parameters, % of the base
    model's parameters, bytes, dtype, active) plus rows for the frozen base model and the total trainable.
    Parameter counts of packed 4-bit weights count the weights they stand for. verbose=True also prints it.
    (04_adapters_on_quantized)"""
    import pandas as pd

    adapter_names = list(model.adapters_config.adapters) if hasattr(model, "adapters_config") else []
    active = set()
    if adapter_names and model.active_adapters is not None:
        active = set(model.active_adapters.flatten())
    owned: set[int] = set()
    rows = []
    for name in adapter_names:
        params = _adapter_parameters(model, name)
        owned.update(id(p) for p in params.values())
        config = model.adapters_config.get(name)
        architecture = (config.get("architecture", None) if not isinstance(config, ConfigUnion) else
                        "+".join(c.get("architecture", None) or "bottleneck" for c in config.configs)) or "bottleneck"
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params.values()})
        rows.append({"name": name, "architecture": architecture,
                     "params": sum(p.numel() for p in params.values()),
                     "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
                     "bytes": sum(p.numel() * p.element_size() for p in params.values()),
                     "dtype": "/".join(dtypes), "active": name in active})
    base = [p for p in model.parameters() if id(p) not in owned]
    base_params = sum(logical_numel(p) for p in base)
    for row in rows:
        row["% of base"] = 100.0 * row["params"] / base_params
    base_row = {"name": "base model", "architecture": type(model).__name__, "params": base_params,
                "trainable": sum(p.numel() for p in base if p.requires_grad),
                "bytes": sum(p.numel() * p.element_size() for p in base),
                "dtype": "/".join(sorted({str(p.dtype).replace("torch.", "") for p in base})), "active": True,
                "% of base": 100.0}
    total_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = base_params + sum(r["params"] for r in rows)
    total = {"name": "total", "architecture": "", "params": total_params, "trainable": total_trainable,
             "bytes": base_row["bytes"] + sum(r["bytes"] for r in rows), "dtype": "", "active": True,
             "% of base": 100.0 * total_trainable / base_params}
    columns = ["name", "architecture", "params", "trainable", "% of base", "bytes", "dtype", "active"]
    frame = pd.DataFrame([*rows, base_row, total], columns=columns).set_index("name")
    if verbose:
        print(frame.to_string(formatters={"% of base": "{:.3f}".format}))
        print(f"trainable: {total_trainable:,} of {total_params:,} parameters "
              f"({100.0 * total_trainable / total_params:.3f}%)")
    return frame
