"""The causal-LM loss computed in chunks of tokens, so that the full (tokens x vocabulary) fp32 logits never exist.

    loss = causal_lm_loss(model, input_ids=ids, labels=labels, position_ids=pos)   # instead of model(...).loss
    loss.backward()
    trainer.compute_loss = chunked_compute_loss                                   # the same inside a Trainer

A causal LM's loss multiplies every hidden state by the output matrix (lm_head: vocabulary x hidden), upcasts
the logits to fp32 and takes a cross-entropy. transformers 4.57 does that for the whole batch at once: for Llama 2
(vocabulary 32,000) that is 128 KB of fp32 logits per token plus the log-softmax kept for backward and the
gradient of both -- at 16k tokens about 6 GiB, more than the 4-bit 7B model itself. `chunked_lm_loss` runs
lm_head and the cross-entropy over `chunk_size` tokens at a time and keeps only the hidden states (hidden x 2
bytes per token); backward recomputes each chunk's logits (one extra lm_head matmul, about 1% of a 7B model's
training FLOPs) and turns them into gradients chunk by chunk. The arithmetic is the one autograd does for
`cross_entropy(lm_head(h).float(), labels)`: logits in the compute dtype, softmax in fp32, the fp32 gradient of the
logits cast back to the compute dtype before the two matmuls of lm_head's backward; so loss and gradients equal
the plain recipe's up to summation order (tests/test_loss.py). Positions whose label is ignored (prompt tokens,
padding, sample boundaries of a packed row) are dropped before lm_head, so they cost nothing.

Written by hand because neither transformers 4.57 nor peft/adapters ship a chunked loss (Liger-Kernel's fused
linear cross-entropy does the same in Triton; it is not among the pinned libraries). `causal_lm_loss` runs the
model's own forward with lm_head swapped, during the call, for a module that computes this loss on lm_head's weight
from the last hidden states (calling the decoder `model.model` directly would skip the forward context that
AdapterHub's prefix tuning needs, and computing the loss after the forward would find an FSDP-sharded lm_head's
weight released); it works on plain transformers models, on models with AdapterHub adapters, on peft models
(lm_head found through `get_base_model()`) and under FSDP or DDP (through `.module`; FSDP checked with 2 CPU
processes in tests/test_distributed.py).

Used by qadapter_utils.train.make_trainer(chunked_loss=True) and benchmarks/ (memory: 07_memory_profiling).
Imports no sibling: works when copied alone (needs only torch; transformers for the model). -100, the ignored
label, is PyTorch's cross_entropy default.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 2048


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The target of every position: the next position's label, and ignore_index after the last one."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(linear(hidden, weight, bias).float(), targets) * scale, in chunks of rows;
    saves hidden/weight/bias/targets only and recomputes each chunk's logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, scale: float):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        logits_dtype = None
        for start in range(0, hidden.shape[0], chunk_size):
            logits = F.linear(hidden[start:start + chunk_size], weight, bias)  # compute dtype (autocast applies)
            logits_dtype = logits.dtype
            logits = logits.float()
            target = targets[start:start + chunk_size]
            total += (torch.logsumexp(logits, dim=-1) - logits.gather(1, target[:, None]).squeeze(1)).sum()
            del logits
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets)
        ctx.has_bias, ctx.chunk_size, ctx.scale = bias is not None, chunk_size, scale
        ctx.logits_dtype = logits_dtype or hidden.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, bias, targets = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and \
            ctx.needs_input_grad[2]
        dtype = ctx.logits_dtype  # the dtype lm_head computed in during forward (autocast is off in backward)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        factor = grad_output.float() * ctx.scale
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[start:start + ctx.chunk_size].to(dtype)
            target = targets[start:start + ctx.chunk_size]
            probs = torch.softmax(F.linear(h, w, b).float(), dim=-1)      # d loss / d logits = softmax - one-hot
            probs[torch.arange(len(target), device=probs.device), target] -= 1.0
            grad_logits = (probs * factor).to(dtype)                       # cast back as autograd's .float() does
            del probs
            if need_h:
                grad_h[start:start + ctx.chunk_size] = (grad_logits @ w).to(hidden.dtype)
            if need_w:
                grad_w += (grad_logits.t() @ h).float()
            if need_b:
                grad_b += grad_logits.float().sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None)


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias=None,
                    chunk_size: int = DEFAULT_CHUNK, ignore_index: int = -100,
                    num_items_in_batch=None, shift: bool = True) -> torch.Tensor:
    """The causal-LM cross-entropy of `hidden` (batch x seq x hidden, the decoder's last hidden states) under
    the output matrix `weight` (vocab x hidden; lm_head.weight) against `labels` (batch x seq), computed
    `chunk_size` tokens at a time; returns a scalar fp32 loss equal to transformers' ForCausalLMLoss.

    shift=True: position t is trained to predict labels[t + 1] (what `model(..., labels=labels)` does);
    shift=False: labels are already the targets of each position. Positions whose target is `ignore_index` are
    left out before the matmul. Reduction: the mean over the counted targets, or their sum divided by
    `num_items_in_batch` when given (the Trainer's gradient-accumulation convention).
    (make_trainer(chunked_loss=True))"""
    if hidden.dim() < 2 or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"hidden must be (..., seq, hidden) and labels (..., seq) with the same leading shape; "
                         f"got hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab, {hidden.shape[-1]}) like lm_head.weight, got {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: use a positive number of tokens per chunk (e.g. 2048)")
    targets = _shift(labels, ignore_index) if shift else labels
    targets = targets.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = targets != ignore_index
    count = keep.sum()
    if not bool(keep.all()):
        index = keep.nonzero().squeeze(1)
        flat, targets = flat.index_select(0, index), targets.index_select(0, index)
    if num_items_in_batch is not None:
        denominator = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    else:
        denominator = float(count.item())
    if targets.numel() == 0:  # nothing to train on: a zero that still connects to the graph
        return (flat.sum() * 0.0).float()
    if int(targets.max()) >= weight.shape[0] or int(targets.min()) < 0:
        raise ValueError(f"labels must be token ids in [0, {weight.shape[0]}) or {ignore_index} (ignored)")
    return _ChunkedLinearCrossEntropy.apply(flat, weight, bias, targets, int(chunk_size), 1.0 / max(denominator,
                                                                                                    1e-12))


def _unwrap(model):
    """The transformers *ForCausalLM inside a peft model, an FSDP or DDP wrapper (or the model itself). The
    forward still runs through the wrapper (FSDP gathers the sharded weights there); only lm_head is found inside."""
    while type(model).__name__ in ("FullyShardedDataParallel", "DistributedDataParallel"):
        model = model.module  # both keep the model as .module (FSDP also forwards attributes to it)
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        return model.get_base_model()
    return model


class _LossHead(torch.nn.Module):
    """Stands in for lm_head during one forward: returns chunked_lm_loss of the hidden states it receives. The loss
    is computed inside the model's own forward, where a sharded lm_head (FSDP) has its weight gathered, and becomes
    the forward's output, so FSDP gathers the weight again for its backward."""

    def __init__(self, head: torch.nn.Module, labels: torch.Tensor, **loss_kwargs):
        super().__init__()
        object.__setattr__(self, "_head", head)  # not a submodule: its parameters stay where they are
        self._labels, self._loss_kwargs = labels, loss_kwargs

    def forward(self, hidden_states):
        head = self._head
        return chunked_lm_loss(hidden_states, head.weight, self._labels, bias=getattr(head, "bias", None),
                               **self._loss_kwargs)


@contextlib.contextmanager
def _lm_head_replaced(base, replacement: torch.nn.Module):
    """Within the block, `base`'s output layer (lm_head) is `replacement`, through every wrapper (adapters' forward
    context, peft, FSDP)."""
    head = base.get_output_embeddings()
    names = [name for name, child in base.named_children() if child is head]
    if not names:
        raise ValueError(f"could not find the output layer of {type(base).__name__} among its direct children")
    setattr(base, names[0], replacement)
    try:
        yield
    finally:
        setattr(base, names[0], head)


def causal_lm_loss(model, input_ids=None, labels=None, *, chunk_size: int = DEFAULT_CHUNK,
                   num_items_in_batch=None, ignore_index: int = -100, **model_kwargs) -> torch.Tensor:
    """The training loss of a transformers causal LM (e.g. LlamaForCausalLM, with AdapterHub adapters, as a peft
    model, under FSDP or DDP) without materialising its logits: runs the model's own forward with its output layer
    (lm_head) swapped, for the duration of the call, for one that computes `chunked_lm_loss` on lm_head's weight
    from the last hidden states. Equals `model(input_ids, labels=labels, ...).loss`. model_kwargs go to the model
    (attention_mask, position_ids, use_cache, ...). (make_trainer(chunked_loss=True))"""
    if labels is None:
        raise ValueError("causal_lm_loss needs labels (the input ids, with -100 where no loss is wanted)")
    base = _unwrap(model)
    if not hasattr(base, "get_output_embeddings") or base.get_output_embeddings() is None:
        raise ValueError(f"{type(base).__name__} is not a transformers causal LM with an output layer "
                         f"(get_output_embeddings()): pass e.g. a LlamaForCausalLM")
    model_kwargs.pop("return_dict", None)
    model_kwargs.setdefault("use_cache", False)
    loss_head = _LossHead(base.get_output_embeddings(), labels, chunk_size=chunk_size, ignore_index=ignore_index,
                          num_items_in_batch=num_items_in_batch)
    with _lm_head_replaced(base, loss_head):
        return model(input_ids=input_ids, return_dict=True, **model_kwargs).logits


def chunked_compute_loss(model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None,
                         chunk_size: int = DEFAULT_CHUNK):
    """A drop-in for `Trainer.compute_loss` (set `trainer.compute_loss = chunked_compute_loss`, or wrap with
    functools.partial for another chunk_size): the batch's loss through causal_lm_loss. No logits are returned
    (return_outputs=True gives (loss, {"loss": loss}), which is what the Trainer's evaluation reads).
    (make_trainer(chunked_loss=True))"""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    input_ids = inputs.pop("input_ids", None)
    loss = causal_lm_loss(model, input_ids, labels, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch,
                          **inputs)
    return (loss, {"loss": loss}) if return_outputs else loss

