"""The pieces of the fast training recipe (issue #13), each switchable and each undoable:

    use_packed_attention(model)          # packed rows: each sample attends only to itself (no (T x T) mask)
    tile_mlp(model, 4096)                # every MLP runs over tiles of 4,096 tokens, each tile checkpointed
    checkpoint_layers(model, 20)         # gradient checkpointing on the first 20 decoder layers only
    with offload_checkpoints():          # what the forward saves for backward waits in CPU memory
        loss = causal_lm_loss(model, **batch)
    loss.backward()

make_trainer(packed_attention=True, tiled_mlp=4096, offload_checkpoints=True, checkpoint_layers=20) switches them
on inside a Trainer (qadapter_utils.train); the chunked loss is qadapter_utils.loss (make_trainer(chunked_loss=True)).
On a CUDA GPU make_trainer uses packed attention and the chunked loss by default (train.fast_defaults).

What each one patches, so that a transformers or adapters upgrade that moves it is found by tests/test_fast.py:

- packed attention: an attention function registered in transformers' `AttentionInterface` (and a mask function in
  `AttentionMaskInterface`) under PACKED_ATTENTION, selected through `model.set_attn_implementation(name)` (which
  writes `config._attn_implementation`). The samples of a packed row (data.make_collator(packing=True): position
  ids restarting at 0 per sample, no attention_mask) are found from the position ids (or from `cu_seq_lens_q` when
  the batch carries it); attention runs per sample through flash-attn's varlen kernel (`flash_attn` when
  importable, else torch's `torch.nn.attention.varlen.varlen_attn`) on a CUDA GPU in fp16/bf16, else one SDPA call
  per sample. transformers' own SDPA path builds a (tokens x tokens) block-diagonal mask instead (O(T^2) memory).
- tiled MLP: an instance attribute `mlp.forward` on every decoder layer's `mlp` (removed by untile_mlp, which puts
  back what was there). The MLP is position-wise, so tiles give the same result; each tile runs under
  `torch.utils.checkpoint.checkpoint(use_reentrant=False)`, so only one tile's (tokens x intermediate) activations
  exist at a time.
- partial checkpointing: the decoder layers' `gradient_checkpointing` flag (transformers' GradientCheckpointingLayer
  runs `layer._gradient_checkpointing_func` when it is set); `model.gradient_checkpointing_enable(...)` installs the
  function on every layer and sets every flag, checkpoint_layers then clears the flags of the layers past the first n.
- offloaded checkpoints: `torch.autograd.graph.save_on_cpu(pin_memory=...)` around the forward. Non-reentrant
  checkpointing keeps each checkpointed layer's input outside its own saved-tensor hooks, so under the context those
  inputs (tokens x hidden each) wait in (pinned) CPU memory until backward needs them; what the recomputation saves
  stays on the GPU. Without checkpointing every saved activation is offloaded (slow; measure first).

Introduced in notebooks/05_training.ipynb (speed: benchmarks/recipe_vs_peft.py and benchmarks/t4_check.py measure
them on a GPU). Needs methods (decoder_layers; methods itself needs guards and weights) and guards
(UsageError).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
import torch.nn.functional as F

try:  # inside the qadapter_utils package
    from .guards import UsageError, check_number
    from .methods import decoder_layers
except ImportError:  # copied next to its siblings (the copy-alone rule: qadapter_utils/__init__.py)
    from guards import UsageError, check_number
    from methods import decoder_layers

#: the name packed_attention is registered under (varlen kernel on a CUDA GPU when there is one)
PACKED_ATTENTION = "qadapter_packed"
#: the same attention, always one SDPA call per sample (the reference the kernel is checked against)
PACKED_ATTENTION_SDPA = "qadapter_packed_sdpa"


def _layers(model, what: str) -> list[torch.nn.Module]:
    layers = decoder_layers(model)
    if not layers:
        raise UsageError(f"{what}: {type(model).__name__} has no decoder layers (model.model.layers); pass a "
                         f"transformers causal LM such as a LlamaForCausalLM (with adapters or as a peft model)")
    return layers


# ---------------------------------------------------------------------------------------------------------------
# attention for packed rows


def packed_segments(position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None):
    """The samples of packed rows: (cu_seqlens as int32 (n_samples + 1,), the longest sample, [(start, end), ...])
    over the flattened (batch x seq) tokens. From `cu_seq_lens` when given (what DataCollatorWithFlattening's
    return_flash_attn_kwargs=True adds), else from `position_ids` (batch x seq): a sample starts at each row start
    and wherever a position is not the previous one + 1. (05_training)"""
    if cu_seq_lens is not None:
        edges = [int(e) for e in cu_seq_lens.tolist()]
        cu = cu_seq_lens.to(torch.int32)
    elif position_ids is not None:
        pos = position_ids.reshape(-1, position_ids.shape[-1])
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        edges = starts.reshape(-1).nonzero().squeeze(1).tolist() + [pos.numel()]
        cu = torch.tensor(edges, dtype=torch.int32, device=pos.device)
    else:
        raise UsageError("packed attention needs position_ids (restarting at 0 for each sample, as "
                         "qadapter_utils.data.make_collator(packing=True) makes them) or cu_seq_lens_q")
    bounds = list(zip(edges[:-1], edges[1:]))
    return cu, max(e - s for s, e in bounds), bounds


@functools.cache
def varlen_kernel():
    """(name, f(q, k, v, cu_seqlens, max_len, scale) -> out) of the varlen flash-attention kernel this machine
    has, for (tokens, heads, dim) fp16/bf16 CUDA tensors with causal attention within each sample: flash-attn's
    `flash_attn_varlen_func` when the package imports, else torch's `varlen_attn` (its keyword arguments changed
    between releases: handled here); (None, None) when there is neither. (05_training)"""
    try:
        from flash_attn import flash_attn_varlen_func

        def flash(q, k, v, cu, max_len, scale):
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True)

        return "flash_attn.flash_attn_varlen_func", flash
    except Exception:  # noqa: BLE001  (not installed, or built for another torch / CUDA)
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # noqa: BLE001
        return None, None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)} \
        if "window_size" in params else None
    if causal is None:
        return None, None
    has_scale = "scale" in params

    def torch_varlen(q, k, v, cu, max_len, scale):
        kw = dict(causal, scale=scale) if has_scale else causal
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)

    return "torch.nn.attention.varlen.varlen_attn", torch_varlen


def _repeat_kv(key, value, heads: int):
    if key.shape[1] != heads:  # grouped-query attention: one key/value head serves several query heads
        rep = heads // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    return key, value


def _packed(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *, kernel: bool, **kwargs):
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        # a padding mask or a KV cache (generation): transformers' own SDPA attention is exact there
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, seq, dim = query.shape
    key, value = _repeat_kv(key, value, heads)
    position_ids = kwargs.get("position_ids")
    cu_given = kwargs.get("cu_seq_lens_q")
    cached = getattr(position_ids, "_qadapter_segments", None) if cu_given is None else None
    cu, max_len, bounds = cached or packed_segments(position_ids, cu_given)
    if cu_given is None and position_ids is not None and cached is None:
        position_ids._qadapter_segments = (cu, max_len, bounds)  # once per forward, not once per layer
    flat = [t.transpose(1, 2).reshape(batch * seq, heads, dim) for t in (query, key, value)]  # (tokens, heads, dim)
    name, fn = varlen_kernel() if kernel else (None, None)
    if fn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout:
        out = fn(*(t.contiguous() for t in flat), cu, max_len, scaling)
    else:
        outs = [F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1)[None] for t in flat), is_causal=True,
                                               dropout_p=dropout, scale=scaling)[0].transpose(0, 1)
                for s, e in bounds]
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.reshape(batch, seq, heads, dim), None


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature ((batch, heads, seq, dim) tensors in, (batch, seq, heads, dim)
    and None out): causal attention within each sample of packed rows, the samples found by packed_segments from
    the `position_ids` (or `cu_seq_lens_q`) transformers hands every attention call; the varlen flash kernel
    (varlen_kernel) on a CUDA GPU in fp16/bf16, else one SDPA call per sample. With a padding mask or a KV cache
    it is transformers' SDPA attention. Registered as PACKED_ATTENTION by register_packed_attention. (05_training)"""
    return _packed(module, query, key, value, attention_mask, dropout, scaling, kernel=True, **kwargs)


def packed_attention_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """packed_attention without the varlen kernel: always one SDPA call per sample (PACKED_ATTENTION_SDPA).
    (05_training)"""
    return _packed(module, query, key, value, attention_mask, dropout, scaling, kernel=False, **kwargs)


def _packed_mask(batch_size, cache_position, kv_length, kv_offset=0, attention_mask=None, **kwargs):
    """The mask function of the packed attention: none for a training forward without padding (the samples come
    from the position ids), transformers' SDPA mask otherwise (padding, or a KV cache during generation)."""
    if attention_mask is None and kv_offset == 0 and kv_length == cache_position.shape[0]:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size, cache_position, kv_length, kv_offset, attention_mask=attention_mask, **kwargs)


def register_packed_attention() -> str:
    """Register packed_attention (PACKED_ATTENTION) and packed_attention_sdpa (PACKED_ATTENTION_SDPA) in
    transformers' `AttentionInterface`, with _packed_mask in `AttentionMaskInterface` (without a mask function
    transformers would drop a padding mask silently for a custom attention). Idempotent; returns PACKED_ATTENTION.
    (05_training)"""
    from transformers import AttentionInterface, AttentionMaskInterface

    for name, fn in ((PACKED_ATTENTION, packed_attention), (PACKED_ATTENTION_SDPA, packed_attention_sdpa)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _packed_mask)
    return PACKED_ATTENTION


def set_attention(model, name: str) -> str:
    """Switch `model` (and its sub-models) to the attention implementation `name` ("sdpa", "eager",
    PACKED_ATTENTION, ...) through `model.set_attn_implementation`, which writes `config._attn_implementation`;
    returns the implementation it had before, to switch back with. (05_training)"""
    previous = model.config._attn_implementation
    if name in (PACKED_ATTENTION, PACKED_ATTENTION_SDPA):
        register_packed_attention()
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise UsageError(f"{type(model).__name__} did not switch to attention {name!r} (it has "
                         f"{model.config._attn_implementation!r}): it does not dispatch through transformers' "
                         f"AttentionInterface")
    return previous


def use_packed_attention(model, kernel: bool = True) -> str:
    """Switch `model` to packed_attention (kernel=False: packed_attention_sdpa); returns the previous
    implementation (set_attention(model, previous) switches back). Refuses adapters' prefix tuning, which
    adapters 1.3.0 computes right only under eager attention. (05_training)"""
    adapter = prefix_tuning_adapter(model)
    if adapter is not None:
        raise UsageError(f"adapter {adapter!r} is prefix tuning, which adapters 1.3.0 computes right only "
                         f"under eager attention: train it without packed attention")
    return set_attention(model, PACKED_ATTENTION if kernel else PACKED_ATTENTION_SDPA)


def prefix_tuning_adapter(model) -> str | None:
    """The name of an adapter of `model` that is (or contains) prefix tuning, else None."""
    configs = getattr(model, "adapters_config", None)
    for adapter in (configs.adapters if configs is not None else ()):
        config = configs.get(adapter)
        parts = getattr(config, "configs", None) or [config]  # a ConfigUnion (e.g. "mam") holds several
        if any(getattr(part, "architecture", None) == "prefix_tuning" for part in parts):
            return adapter
    return None


def check_varlen_kernel(device: str = "cuda", lengths=(37, 300, 129, 511, 64), heads: int = 32, dim: int = 128,
                        dtype=torch.bfloat16) -> dict:
    """Compare the varlen kernel with per-sample SDPA on random data (outputs and gradients, relative errors);
    "ok" when they agree within bf16 rounding. On a machine without a kernel or without CUDA: {"kernel": None}.
    (benchmarks/recipe_vs_peft.py records it)"""
    name, fn = varlen_kernel()
    if fn is None or not torch.cuda.is_available():
        return {"kernel": None, "status": "no varlen kernel here: per-sample SDPA"}
    g = torch.Generator(device=device).manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn((1, heads, total, dim), device=device, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    scale = dim ** -0.5
    try:
        ref = packed_attention_sdpa(None, q, k, v, None, scaling=scale, position_ids=position_ids)[0]
        grad_out = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
        out = packed_attention(None, q, k, v, None, scaling=scale, position_ids=position_ids.clone())[0]
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    except Exception as err:  # noqa: BLE001
        return {"kernel": name, "ok": False, "status": f"failed ({type(err).__name__}: {str(err)[:200]})"}

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    err_out, err_grad = rel(out, ref), max(rel(a, b) for a, b in zip(grads, ref_grads))
    ok = err_out < 2e-2 and err_grad < 5e-2 and math.isfinite(err_out) and math.isfinite(err_grad)
    return {"kernel": name, "ok": ok, "rel_err_out": err_out, "rel_err_grad": err_grad,
            "status": "varlen kernel agrees with per-sample SDPA" if ok else "varlen kernel disagrees"}


# ---------------------------------------------------------------------------------------------------------------
# the tiled MLP


class _TiledForward:
    """mlp.forward over tiles of `tokens` tokens (the leading dimensions flattened), each tile checkpointed when
    autograd records."""

    def __init__(self, original, tokens: int):
        self.original, self.tokens = original, tokens

    def __call__(self, x, *args, **kwargs):
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= self.tokens:
            return self.original(x, *args, **kwargs)
        parts = []
        for start in range(0, flat.shape[0], self.tokens):
            piece = flat[start:start + self.tokens]
            if torch.is_grad_enabled():
                parts.append(torch.utils.checkpoint.checkpoint(self.original, piece, *args, use_reentrant=False,
                                                               **kwargs))
            else:
                parts.append(self.original(piece, *args, **kwargs))
        out = torch.cat(parts)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def tile_mlp(model, tokens: int) -> int:
    """Run every decoder layer's MLP over tiles of `tokens` tokens, each tile checkpointed (non-reentrant), so
    only one tile's (tokens x intermediate_size) activations exist at a time; the MLP is position-wise, so the
    result is the same. Sets the instance attribute `layer.mlp.forward` (again: changes the tile size);
    untile_mlp removes it. Returns the number of MLPs tiled. (05_training)"""
    check_number("tokens", tokens, low=1, integer=True,
                 hint="tokens per MLP tile, e.g. 4096 (untile_mlp(model) removes the tiling)")
    layers = _layers(model, "tile_mlp")
    missing = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer, "mlp", None), torch.nn.Module)]
    if missing:
        raise UsageError(f"tile_mlp: decoder layers {missing[:4]} of {type(model).__name__} have no `mlp` module "
                         f"(a Llama/Mistral-style layer.mlp): nothing to tile")
    for layer in layers:
        current = layer.mlp.__dict__.get("forward")
        if isinstance(current, _TiledForward):
            current.tokens = tokens
        else:
            layer.mlp.forward = _TiledForward(layer.mlp.forward, tokens)
    return len(layers)


def untile_mlp(model) -> int:
    """Undo tile_mlp: put back each MLP's forward as it was before (its class's forward, or the instance
    forward another library had set). Returns the number of MLPs untiled. (05_training)"""
    n = 0
    for layer in _layers(model, "untile_mlp"):
        mlp = getattr(layer, "mlp", None)
        tiled = getattr(mlp, "__dict__", {}).get("forward")
        if isinstance(tiled, _TiledForward):
            original = tiled.original
            if getattr(original, "__self__", None) is mlp and getattr(original, "__func__", None) is \
                    type(mlp).forward:
                del mlp.forward  # the class's forward again
            else:
                mlp.forward = original
            n += 1
    return n


def mlp_tile(model) -> int | None:
    """The tile size tile_mlp set on `model`'s MLPs, or None when they are not tiled. (05_training)"""
    layers = decoder_layers(model)
    tiled = [getattr(layer, "mlp", None).__dict__.get("forward") for layer in layers if hasattr(layer, "mlp")]
    sizes = {t.tokens for t in tiled if isinstance(t, _TiledForward)}
    return sizes.pop() if len(sizes) == 1 else None


# ---------------------------------------------------------------------------------------------------------------
# checkpointing some layers, offloading what is kept


def checkpoint_layers(model, n: int) -> int:
    """Gradient checkpointing on the first `n` decoder layers only; the others keep their activations for
    backward (faster, more memory). Sets each layer's `gradient_checkpointing` flag, which transformers'
    GradientCheckpointingLayer reads; the checkpoint function itself (`layer._gradient_checkpointing_func`) is
    installed by `model.gradient_checkpointing_enable(...)`, which must have run first (make_trainer's
    checkpoint_layers= does both; a Trainer re-enables all layers when training starts, so set it after). n equal
    to the number of layers checkpoints all of them again. Returns the number of layers. (05_training)"""
    layers = _layers(model, "checkpoint_layers")
    check_number("n", n, low=0, high=len(layers), integer=True,
                 hint=f"how many decoder layers to checkpoint, from 0 to {len(layers)}")
    if n and not all(hasattr(layer, "_gradient_checkpointing_func") for layer in layers):
        raise UsageError("checkpoint_layers: gradient checkpointing is not enabled on this model; call "
                         "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
                         "False}) first (or pass gradient_checkpointing=True to add_adapter / make_trainer)")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n
    return len(layers)


def checkpointed_layers(model) -> list[int]:
    """The indices of the decoder layers that gradient checkpointing recomputes in backward. (05_training)"""
    return [i for i, layer in enumerate(decoder_layers(model)) if getattr(layer, "gradient_checkpointing", False)]


@contextlib.contextmanager
def offload_checkpoints(pin_memory: bool | None = None):
    """Within the block, the tensors the forward saves for backward go to CPU memory
    (`torch.autograd.graph.save_on_cpu(pin_memory=...)`) and come back when backward needs them; backward may
    run after the block. With non-reentrant gradient checkpointing that is each checkpointed layer's input
    (tokens x hidden); what the recomputation saves stays on the GPU. pin_memory: default True when CUDA is
    available (faster copies, page-locked host memory). (05_training)"""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
        yield


def offloaded(compute_loss, pin_memory: bool | None = None):
    """`compute_loss` (a Trainer's compute_loss, or chunked_compute_loss) running under offload_checkpoints: set
    `trainer.compute_loss = offloaded(trainer.compute_loss)` (make_trainer(offload_checkpoints=True) does).
    (05_training)"""
    @functools.wraps(compute_loss)
    def wrapper(*args, **kwargs):
        with offload_checkpoints(pin_memory):
            return compute_loss(*args, **kwargs)

    wrapper.qadapter_offloaded = True
    return wrapper
