"""qadapter_utils.fast: every piece of the fast recipe gives the plain recipe's numbers, patches exactly the library
internal its docstring names, and is removed cleanly.

On the embedded tiny Llama 2 (fp32 on the CPU, unquantized and 4-bit NF4), LoRA with random A and B so every
adapter gradient is non-zero. Tolerances are fp32 summation-order noise: 1e-4 relative to the largest entry.
"""
from __future__ import annotations

import pytest
import torch

from qadapter_utils import fast
from qadapter_utils.data import world_qa
from qadapter_utils.guards import UsageError
from qadapter_utils.loss import causal_lm_loss
from qadapter_utils.methods import add_adapter
from qadapter_utils.models import load_model
from qadapter_utils.train import make_trainer

RTOL = 1e-4
LENGTHS = (23, 9, 17, 31)


def _rows(seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 512, (n - 1,), generator=g).tolist() for n in lengths]


def _packed(rows, prompt=3):
    ids = torch.tensor([t for r in rows for t in r])[None]
    pos = torch.tensor([p for r in rows for p in range(len(r))])[None]
    labels = torch.tensor([(t if 0 < p and p >= prompt else -100) for r in rows for p, t in enumerate(r)])[None]
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "use_cache": False}


def _model(bits=4):
    torch.manual_seed(0)
    model, tok = load_model("tiny", bits=bits)
    add_adapter(model, "lora", init_weights="bert", gradient_checkpointing=True)
    model.train()
    return model, tok


@pytest.fixture(scope="module")
def model4():
    return _model(4)[0]


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_close(ref, ours):
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=0)
    assert ref[1].keys() == ours[1].keys() and ref[1]
    for name, g in ref[1].items():
        scale = g.abs().max()
        assert scale > 0, f"{name}: zero gradient, the check would prove nothing"
        assert (ours[1][name] - g).abs().max() / scale < RTOL, name


def _untouched(model):
    """No trace of fast's patches: SDPA attention, no instance forward on any MLP, every layer checkpointed."""
    assert model.config._attn_implementation == "sdpa"
    assert all("forward" not in layer.mlp.__dict__ for layer in fast.decoder_layers(model))
    assert fast.checkpointed_layers(model) == list(range(model.config.num_hidden_layers))


# ---------------------------------------------------------------------------------------------------------------
# packed attention


@pytest.mark.parametrize("bits", [None, 4])
def test_packed_logits_equal_per_sample_logits(bits):
    model, _ = load_model("tiny", bits=bits)
    model.eval()
    rows = _rows()
    batch = _packed(rows)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([r]), use_cache=False).logits[0] for r in rows])
        naive = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # one long sequence
        previous = fast.use_packed_attention(model)
        assert previous == "sdpa" and model.config._attn_implementation == fast.PACKED_ATTENTION
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        # with a KV cache transformers would stop separating the samples; the packed attention does not
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
        fast.set_attention(model, previous)
    assert (naive - alone).abs().max() > 1e-2  # the comparison can fail
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-4)
    torch.testing.assert_close(cached, alone, rtol=0, atol=1e-4)
    assert model.config._attn_implementation == "sdpa"


def test_padding_mask_and_cached_generation_are_exact_under_packed_attention():
    """A padding mask reaches the packed attention (its mask function in AttentionMaskInterface), and cached greedy
    generation gives the same tokens as under SDPA."""
    model, tok = load_model("tiny", bits=None)
    model.eval()
    rows = _rows(seed=1, lengths=(20, 7))
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = torch.tensor(rows[0]), 1
    ids[1, -7:], mask[1, -7:] = torch.tensor(rows[1]), 1  # left padding: a causal-only attention would be wrong
    prompt = torch.tensor([rows[0][:8]])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        ref_gen = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        previous = fast.use_packed_attention(model)
        out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        gen = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        fast.set_attention(model, previous)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, -7:], ref[1, -7:], rtol=0, atol=1e-5)
    assert torch.equal(gen, ref_gen)


def test_attention_function_segments_grouped_query_heads_and_errors():
    g = torch.Generator().manual_seed(0)
    lengths = (5, 1, 12, 6)
    q = torch.randn(1, 4, sum(lengths), 8, generator=g)
    k, v = torch.randn(1, 2, sum(lengths), 8, generator=g), torch.randn(1, 2, sum(lengths), 8, generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu, longest, bounds = fast.packed_segments(pos)
    assert cu.tolist() == [0, 5, 6, 18, 24] and longest == 12 and bounds[1] == (5, 6)
    assert fast.packed_segments(cu_seq_lens=cu)[2] == bounds
    out, weights = fast.packed_attention(None, q, k, v, None, scaling=0.3, position_ids=pos)
    assert weights is None and out.shape == (1, sum(lengths), 4, 8)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # 2 query heads per key/value head
    for s, e in bounds:
        ref = torch.softmax((q[0, :, s:e] @ kk[0, :, s:e].transpose(-1, -2)) * 0.3
                            + torch.full((e - s, e - s), float("-inf")).triu(1), -1) @ vv[0, :, s:e]
        torch.testing.assert_close(out[0, s:e], ref.transpose(0, 1), rtol=0, atol=1e-5)
    with pytest.raises(UsageError, match="position_ids"):
        fast.packed_attention(None, q, k, v, None)
    assert fast.varlen_kernel()[1] is None or fast.varlen_kernel()[0]  # CPU: per-sample SDPA either way
    assert fast.check_varlen_kernel()["kernel"] is None or torch.cuda.is_available()


def test_packed_attention_refuses_prefix_tuning_and_models_it_cannot_switch():
    model, _ = load_model("tiny", bits=None)
    model.set_attn_implementation("eager")
    add_adapter(model, "prefix_flat")
    with pytest.raises(UsageError, match="prefix tuning"):
        fast.use_packed_attention(model)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(UsageError, match="no decoder layers"):
        fast.tile_mlp(torch.nn.Linear(2, 2), 4)


# ---------------------------------------------------------------------------------------------------------------
# tiled MLP, partial checkpointing, offloading


def test_tiled_mlp_equals_untiled_forward_and_gradients_and_is_removed():
    model, _ = load_model("tiny", bits=None)
    mlp = fast.decoder_layers(model)[0].mlp
    for p in mlp.parameters():
        p.requires_grad_(True)
    x = torch.randn(2, 21, model.config.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def run():
        calls = []
        hook = mlp.gate_proj.register_forward_hook(lambda *a: calls.append(1))
        out = mlp(x)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(),
                                    (x, *mlp.parameters()))
        hook.remove()
        return out.detach(), grads, len(calls)

    ref, ref_grads, ref_calls = run()
    assert fast.tile_mlp(model, 5) == model.config.num_hidden_layers and fast.mlp_tile(model) == 5
    out, grads, calls = run()
    assert calls == 2 * 9  # 42 tokens in 9 tiles, each run again in backward: every tile is checkpointed
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    with torch.no_grad():  # no autograd: tiles, no checkpoints
        torch.testing.assert_close(mlp(x), ref, rtol=0, atol=1e-6)
    fast.tile_mlp(model, 64)  # tiling again changes the tile size, no second wrapper
    assert fast.mlp_tile(model) == 64 and not isinstance(mlp.forward.original, type(mlp.forward))
    assert fast.untile_mlp(model) == model.config.num_hidden_layers and fast.mlp_tile(model) is None
    assert "forward" not in mlp.__dict__ and fast.untile_mlp(model) == 0
    own = lambda h: h * 2  # noqa: E731  another library's instance forward is put back as it was
    mlp.forward = own
    fast.tile_mlp(model, 3)
    fast.untile_mlp(model)
    assert mlp.forward is own
    del mlp.forward
    with pytest.raises(UsageError, match="tokens"):
        fast.tile_mlp(model, 0)
    del fast.decoder_layers(model)[2].mlp
    with pytest.raises(UsageError, match=r"\[2\] .* no `mlp`"):
        fast.tile_mlp(model, 8)


def test_checkpoint_layers_checkpoints_exactly_the_chosen_layers(model4):
    layers = fast.decoder_layers(model4)
    batch = _packed(_rows(seed=2))
    counts = [0] * len(layers)
    hooks = [layer.self_attn.register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
             for i, layer in enumerate(layers)]
    try:
        for n in (0, 2, len(layers)):
            counts[:] = [0] * len(layers)
            assert fast.checkpoint_layers(model4, n) == len(layers) and fast.checkpointed_layers(model4) == \
                list(range(n))
            model4(**batch).loss.backward()
            assert counts == [2] * n + [1] * (len(layers) - n)  # a checkpointed layer runs again in backward
    finally:
        for h in hooks:
            h.remove()
        model4.zero_grad(set_to_none=True)
    with pytest.raises(UsageError, match="from 0 to 4"):
        fast.checkpoint_layers(model4, 5)
    plain, _ = load_model("tiny", bits=None)
    with pytest.raises(UsageError, match="gradient_checkpointing_enable"):
        fast.checkpoint_layers(plain, 1)
    assert fast.checkpoint_layers(plain, 0) == 4


def test_offloaded_checkpoints_give_the_same_gradients(model4, monkeypatch):
    batch = _packed(_rows(seed=3))
    ref = _grads(model4, lambda: model4(**batch).loss)
    packed = []

    class Counting(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook
            self.pack_hook = lambda t: (packed.append(t.shape), pack(t))[1]

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)

    def ours():
        with fast.offload_checkpoints():
            return model4(**batch).loss  # backward runs after the block, from CPU memory

    _assert_close(ref, _grads(model4, ours))
    hidden = [s for s in packed if tuple(s) == (1, sum(LENGTHS), model4.config.hidden_size)]
    assert len(hidden) >= model4.config.num_hidden_layers  # at least every checkpointed layer's input


def test_all_pieces_together_give_the_plain_recipes_gradients_and_are_removed(model4):
    """Packed attention + tiled MLP + 2 of 4 layers checkpointed + offloaded checkpoints + chunked loss against
    transformers' own packed SDPA path with the full loss: same loss and LoRA gradients; then undone."""
    batch = _packed(_rows(seed=4))
    ref = _grads(model4, lambda: model4(**batch).loss)
    previous = fast.use_packed_attention(model4)
    fast.tile_mlp(model4, 16)
    fast.checkpoint_layers(model4, 2)

    def ours():
        with fast.offload_checkpoints(pin_memory=False):
            return causal_lm_loss(model4, chunk_size=32, **batch)

    try:
        _assert_close(ref, _grads(model4, ours))
    finally:
        fast.set_attention(model4, previous)
        fast.untile_mlp(model4)
        fast.checkpoint_layers(model4, len(fast.decoder_layers(model4)))
    _untouched(model4)
    _assert_close(ref, _grads(model4, lambda: model4(**batch).loss))


# ---------------------------------------------------------------------------------------------------------------
# make_trainer's switches

TRAIN = world_qa(as_dataset=False)[0][:24]
SWITCHES = {"plain": {}, "packed_attention": dict(packed_attention=True), "tiled_mlp": dict(tiled_mlp=8),
            "offload_checkpoints": dict(offload_checkpoints=True), "checkpoint_layers": dict(checkpoint_layers=1),
            "all": dict(packed_attention=True, tiled_mlp=8, offload_checkpoints=True, checkpoint_layers=3,
                        chunked_loss=True, chunk_size=16)}


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("plain"), {})[0]


def _train(folder, switches):
    model, tok = _model(4)
    trainer = make_trainer(model, tok, TRAIN, output_dir=folder, max_steps=3, per_device_train_batch_size=8,
                           learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, **switches)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], model, trainer


@pytest.mark.parametrize("name", [n for n in SWITCHES if n != "plain"])
def test_make_trainer_switch_trains_like_the_plain_recipe(name, plain_losses, tmp_path):
    losses, model, trainer = _train(tmp_path, SWITCHES[name])
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-4, atol=0)
    switches = SWITCHES[name]
    attention = fast.PACKED_ATTENTION if switches.get("packed_attention") else "sdpa"
    assert model.config._attn_implementation == attention
    assert fast.mlp_tile(model) == switches.get("tiled_mlp")
    assert getattr(trainer.compute_loss, "qadapter_offloaded", False) == bool(switches.get("offload_checkpoints"))
    if "checkpoint_layers" in switches:  # applied after the Trainer enabled checkpointing on every layer
        assert trainer.args.gradient_checkpointing
        assert fast.checkpointed_layers(model) == list(range(switches["checkpoint_layers"]))


def test_make_trainer_refuses_misused_switches_before_changing_the_model():
    model, tok = _model(4)
    with pytest.raises(UsageError, match="packing=True"):
        make_trainer(model, tok, TRAIN, packing=False, packed_attention=True)
    with pytest.raises(UsageError, match="tiled_mlp"):
        make_trainer(model, tok, TRAIN, packed_attention=True, tiled_mlp=0)
    with pytest.raises(UsageError, match="checkpoint_layers"):
        make_trainer(model, tok, TRAIN, checkpoint_layers=9)
    with pytest.raises(UsageError, match="gradient_checkpointing=False"):
        make_trainer(model, tok, TRAIN, checkpoint_layers=2, gradient_checkpointing=False)
    assert model.config._attn_implementation == "sdpa" and fast.mlp_tile(model) is None
