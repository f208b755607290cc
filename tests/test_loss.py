"""qadapter_utils.loss: the chunked causal-LM loss gives the plain recipe's loss AND gradients.

Reference: transformers' own `model(input_ids, labels=labels).loss` (full logits, ForCausalLMLoss) and autograd
through it. Checked on the embedded tiny Llama 2 loaded in 4-bit NF4 with a LoRA adapter (fp32 on the CPU), on
padded and packed batches, with chunks smaller than the batch so several chunks and the boundaries between them are
exercised. Tolerance: relative 1e-5 on the loss and 1e-4 (relative to the largest gradient entry) on every
adapter gradient -- fp32 arithmetic, only the order of summation differs.
"""
from __future__ import annotations

import pytest
import torch

from qadapter_utils.loss import causal_lm_loss, chunked_compute_loss, chunked_lm_loss
from qadapter_utils.methods import add_adapter
from qadapter_utils.models import load_model

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _rows(seed=0, lengths=(23, 9, 17)):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 512, (n - 1,), generator=g).tolist() for n in lengths]


def _padded(rows, prompt=4):
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, prompt:len(r)] = torch.tensor(r[prompt:])  # prompt tokens masked out of the loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed(rows, prompt=4):
    ids = torch.tensor([t for r in rows for t in r])[None]
    pos = torch.tensor([p for r in rows for p in range(len(r))])[None]
    labels = torch.tensor([(t if p >= prompt else -100) for r in rows for p, t in enumerate(r)])[None]
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "use_cache": False}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m, _ = load_model("tiny", bits=4)
    add_adapter(m, "lora", init_weights="bert")  # random A and B: every LoRA gradient is non-zero
    m.train()
    return m


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(ref, ours):
    (loss_ref, g_ref), (loss_ours, g_ours) = ref, ours
    assert torch.isfinite(loss_ref) and loss_ref > 0
    torch.testing.assert_close(loss_ours, loss_ref, rtol=LOSS_RTOL, atol=0)
    assert g_ref.keys() == g_ours.keys() and len(g_ref) > 0
    for name in g_ref:
        scale = g_ref[name].abs().max()
        assert scale > 0, f"{name}: zero gradient, the check would prove nothing"
        err = (g_ours[name] - g_ref[name]).abs().max() / scale
        assert err < GRAD_RTOL, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_equals_plain_loss_and_gradients(model, layout):
    batch = _padded(_rows()) if layout == "padded" else _packed(_rows())
    ref = _loss_and_grads(model, lambda: model(**batch).loss)
    inputs = dict(batch)
    ours = _loss_and_grads(model, lambda: causal_lm_loss(model, chunk_size=7, **inputs))
    _assert_same(ref, ours)


def test_bf16_autocast_adds_no_error_beyond_the_plain_recipes_own_rounding(model):
    """The GPU case (bf16 autocast, as Trainer(bf16=True)): lm_head and the logits' gradient in bf16. Against an
    fp32 run of the plain recipe, bf16 moves every gradient by ~1 % (measured: median 1.3e-2 relative); the chunked
    loss must not add to that: its gradients sit within a tenth of that noise of the plain bf16 recipe's
    (measured on this CPU: bit-identical)."""
    batch = _padded(_rows(seed=4, lengths=(40, 31, 52)))

    def run(fn, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return _loss_and_grads(model, fn)

    exact = run(lambda: model(**batch).loss, bf16=False)
    plain = run(lambda: model(**batch).loss, bf16=True)
    ours = run(lambda: causal_lm_loss(model, chunk_size=16, **batch), bf16=True)

    def rel(a, b):
        return max(float((a[1][n] - b[1][n]).norm() / b[1][n].norm()) for n in b[1])

    noise = rel(plain, exact)
    assert noise > 1e-4, "bf16 autocast did not change the gradients: the comparison would prove nothing"
    assert rel(ours, plain) <= 0.1 * noise, (rel(ours, plain), noise)
    assert abs(float(ours[0] - plain[0])) <= 0.1 * abs(float(plain[0] - exact[0])) + 1e-6


def test_num_items_in_batch_and_trainer_hook(model):
    batch = _packed(_rows(seed=1))
    n = 20  # the Trainer passes the number of target tokens of all accumulated micro-batches
    ref = _loss_and_grads(model, lambda: model(**batch, num_items_in_batch=n).loss)
    ours = _loss_and_grads(model, lambda: chunked_compute_loss(model, batch, num_items_in_batch=n, chunk_size=5))
    _assert_same(ref, ours)


def test_prefix_tuning_goes_through_the_model_forward():
    """causal_lm_loss runs the model's own forward, so adapters' forward context (which computes the prefix
    states) is opened as usual: prefix tuning gives the same loss and gradients. Eager attention: with SDPA's
    boolean masks adapters 1.3.0 masks its own prefix out (the prefix gets no gradient, in the plain recipe too)."""
    torch.manual_seed(0)
    m, _ = load_model("tiny", bits=4)
    m.set_attn_implementation("eager")
    add_adapter(m, "prefix_flat")
    m.train()
    batch = _padded(_rows(seed=2))
    ref = _loss_and_grads(m, lambda: m(**batch).loss)
    ours = _loss_and_grads(m, lambda: causal_lm_loss(m, chunk_size=16, **batch))
    _assert_same(ref, ours)


def test_function_level_gradients_of_weight_bias_and_hidden_in_bfloat16():
    """Against autograd through lm_head + cross_entropy on plain tensors, bias and weight gradients included,
    with bf16 inputs (the GPU case): the same casts in the same places, so the results agree to bf16 rounding."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 13, 32, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(50, 32, generator=g) * 0.2).bfloat16().requires_grad_()
    bias = (torch.randn(50, generator=g) * 0.1).bfloat16().requires_grad_()
    labels = torch.randint(0, 50, (2, 13), generator=g)
    labels[0, :3] = -100
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias))
    ours = chunked_lm_loss(hidden, weight, labels, bias=bias, chunk_size=4)
    our_grads = torch.autograd.grad(ours, (hidden, weight, bias))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    for a, b in zip(our_grads, ref_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_bad_input_is_refused_early():
    h = torch.randn(1, 5, 8)
    w = torch.randn(11, 8)
    with pytest.raises(ValueError, match="labels"):
        chunked_lm_loss(h, w, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        chunked_lm_loss(h, w, torch.full((1, 5), 11))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_lm_loss(h, w, torch.zeros(1, 5, dtype=torch.long), chunk_size=0)
