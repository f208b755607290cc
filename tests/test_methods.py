"""Tests for qadapter_utils.methods: presets, add_adapter on quantized bases, error paths, save/load, summary."""
import warnings

import adapters
import pytest
import torch

from qadapter_utils.methods import (
    DESCRIPTIONS,
    PRESETS,
    AdapterMethodError,
    adapter_config,
    add_adapter,
    add_fusion,
    load_adapter,
    save_adapter,
    trainable_summary,
)
from qadapter_utils.models import load_model

warnings.filterwarnings("ignore", message="MatMul8bitLt")


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny")[1]


def fresh(bits=None, name="tiny", **kwargs):
    torch.manual_seed(0)
    return load_model(name, bits=bits, **kwargs)[0]


def ids(tok, n=2, length=12):
    from qadapter_utils.tiny.corpus import corpus

    return tok(corpus("validation", n_paragraphs=n), return_tensors="pt", truncation=True, max_length=length,
               padding="max_length").input_ids


# --- presets and adapter_config -------------------------------------------------------------------------------

def test_presets_are_documented_and_fresh():
    required = {"lora", "lora_all", "prefix", "seq_bn", "par_bn", "double_seq_bn", "ia3", "mam", "unipelt",
                "loreft", "vera"}
    assert required <= set(PRESETS)
    assert set(DESCRIPTIONS) == set(PRESETS) and all(DESCRIPTIONS.values())
    for name, factory in PRESETS.items():
        assert isinstance(factory(), adapters.AdapterConfig), name
        assert factory() is not factory()


def test_lora_presets_match_the_benchmark_defaults():
    lora = adapter_config("lora")
    assert (type(lora), lora.r, lora.alpha, lora.attn_matrices) == (adapters.LoRAConfig, 16, 32, ["q", "v"])
    every = adapter_config("lora_all")
    assert every.r == 16 and every.attn_matrices == ["q", "k", "v"]
    assert every.intermediate_lora and every.output_lora


def test_overrides_are_applied_and_objects_accepted():
    assert adapter_config("lora", r=4).r == 4
    assert adapter_config("seq_bn", reduction_factor=8).reduction_factor == 8
    config = adapters.LoRAConfig(r=2)
    assert adapter_config(config) is config and adapter_config(config, alpha=4).alpha == 4
    union = adapter_config("unipelt", r=4)  # goes to the LoRA component only
    assert [getattr(c, "r", None) for c in union.configs] == [None, None, 4]


def test_unknown_preset_lists_the_presets():
    with pytest.raises(AdapterMethodError, match=r"unknown adapter method 'lorra'.*lora, lora_all"):
        adapter_config("lorra")


def test_bad_override_names_valid_fields():
    with pytest.raises(AdapterMethodError, match=r"LoRAConfig has no field 'rank'; valid fields: .*\br\b"):
        adapter_config("lora", rank=8)
    with pytest.raises(AdapterMethodError, match=r"UniPELTConfig has no field 'nope'"):
        adapter_config("unipelt", nope=1)


def test_bad_method_type():
    with pytest.raises(AdapterMethodError, match="preset name"):
        adapter_config(42)


# --- error paths on a model ------------------------------------------------------------------------------------

def test_prompt_tuning_on_llama_is_refused_with_alternatives():
    model = fresh()
    with pytest.raises(AdapterMethodError, match=r"prompt tuning is not supported on LlamaForCausalLM.*'prefix'"):
        add_adapter(model, "prompt_tuning")
    assert not hasattr(model, "adapters_config") or "prompt_tuning" not in model.adapters_config


@pytest.mark.parametrize("bits", [4, 8])
def test_dora_on_quantized_base_is_refused(bits):
    with pytest.raises(AdapterMethodError, match=rf"DoRA .* {bits}-bit quantized weights.*Use 'lora'"):
        add_adapter(fresh(bits), "dora")
    with pytest.raises(AdapterMethodError, match="DoRA"):
        add_adapter(fresh(bits), adapters.LoRAConfig(use_dora=True))


def test_dora_adapters_own_failure_is_what_we_prevent():
    """Without our check, adapters 1.3.0 fails deep inside on the packed 4-bit weight (if this starts passing,
    a newer adapters supports DoRA on 4-bit and the check can go)."""
    model = fresh(4)
    adapters.init(model)
    with pytest.raises(RuntimeError, match="vector_norm"):
        model.add_adapter("d", config=adapters.DoRAConfig())


def test_vera_on_gqa_is_refused():
    with pytest.raises(AdapterMethodError, match=r"VeRA .* grouped-query attention .*'lora'"):
        add_adapter(fresh(4, "random:mistral-tiny"), "vera")


def test_duplicate_and_bad_names():
    model = fresh(4)
    add_adapter(model, "lora", name="mine")
    with pytest.raises(AdapterMethodError, match="already has an adapter named 'mine'"):
        add_adapter(model, "lora", name="mine")
    with pytest.raises(AdapterMethodError, match="not usable"):
        add_adapter(model, "lora", name="a.b")


# --- add_adapter on a 4-bit base -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "prefix", "seq_bn", "unipelt"])
def test_add_adapter_4bit_trains_only_the_adapter(tok, method):
    model = fresh(4)
    name = add_adapter(model, method)
    assert name == method and model.training
    assert name in model.active_adapters.flatten()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name in n.split(".") for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    batch = ids(tok)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_bf16_base_keeps_fp32_adapter_and_trains(tok):
    """A base computing in bf16 (as on a GPU): the adapter stays fp32, activations are cast at its edges."""
    model = fresh(4, compute_dtype="bf16")
    add_adapter(model, "lora_all")
    batch = ids(tok)
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lora_all", "seq_bn", "prefix", "ia3"])
def test_input_casts_are_a_round_trip_under_autocast_and_come_back(tok, method):
    """Under autocast (what Trainer(bf16=True) runs) the fp32 input casts at the adapters' edges change nothing:
    loss and every adapter gradient are bit-identical without them (make_trainer suspends them while it trains in
    mixed precision); what each adapter hands back stays in the model's dtype; afterwards they are back, so a
    forward without autocast still works."""
    from qadapter_utils.methods import cast_hooks_suspended

    model = fresh(None, compute_dtype="bf16")
    add_adapter(model, method)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:  # away from adapters' zero init, so every gradient path is exercised
            p.data.normal_(0, 0.05)
    model.train()
    batch = ids(tok)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def hooked():  # modules whose inputs are cast
        return sum(bool(getattr(m, "_qadapter_cast_hooks", ())) and getattr(m, "_qadapter_casts_inputs", True)
                   for m in model.modules())

    outputs = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, out: outputs.append(out.dtype))
    before = hooked()
    loss, grads = loss_and_grads()
    with cast_hooks_suspended(model) as n:
        assert n == before > 0 and hooked() == 0
        loss_without, grads_without = loss_and_grads()
    assert hooked() == before and set(outputs) == {torch.bfloat16}  # (IA)^3 scales the keys: still bf16
    assert torch.equal(loss, loss_without) and grads.keys() == grads_without.keys() and len(grads) > 0
    assert all(torch.equal(grads[k], grads_without[k]) for k in grads)
    with pytest.raises(KeyboardInterrupt), cast_hooks_suspended(model):  # back after an error too
        raise KeyboardInterrupt
    assert hooked() == before
    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch).loss.backward()  # with them back, no autocast needed


def test_gradient_checkpointing_gives_the_same_gradients(tok):
    batch = ids(tok)
    grads = []
    for checkpointing in (False, True):
        model = fresh(4)
        add_adapter(model, "lora", gradient_checkpointing=checkpointing)
        assert model.is_gradient_checkpointing == checkpointing
        model(input_ids=batch, labels=batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


# --- save / load ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,bits", [("lora", 4), ("prefix", 4), ("seq_bn", 8), ("loreft", 4)])
def test_save_load_gives_identical_logits(tok, tmp_path, method, bits):
    batch = ids(tok)
    model = fresh(bits)
    name = add_adapter(model, method)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # move the adapter away from its initialisation (LoRA starts as a no-op)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    folder = save_adapter(model, name, tmp_path / "saved")
    assert sorted(f.name for f in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json"]  # no lm_head
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch).logits
        base = fresh(bits)
        assert not torch.equal(base(input_ids=batch).logits, expected)  # the adapter changes the output
        loaded = load_adapter(base, folder)
        assert loaded == name and name in base.active_adapters.flatten()
        assert torch.equal(base(input_ids=batch).logits, expected)


def test_load_adapter_wrong_folder(tmp_path):
    with pytest.raises(AdapterMethodError, match="no adapter_config.json"):
        load_adapter(fresh(), tmp_path)


# --- trainable_summary ------------------------------------------------------------------------------------------

def test_trainable_summary_counts():
    model = fresh(4)
    add_adapter(model, "seq_bn")
    add_adapter(model, "lora")  # trained now; seq_bn stays added but frozen
    table = trainable_summary(model)
    config = model.config
    n_layers, hidden = config.num_hidden_layers, config.hidden_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    assert table.loc["lora", "params"] == n_layers * 16 * ((hidden + hidden) + (hidden + kv))
    assert table.loc["lora", "trainable"] == table.loc["lora", "params"]
    assert table.loc["seq_bn", "trainable"] == 0 and table.loc["seq_bn", "params"] > 0
    assert table.loc["total", "trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert table.loc["lora", "bytes"] == 4 * table.loc["lora", "params"]
    # the base counts the weights packed 4-bit parameters stand for: the same as the unquantized model
    assert table.loc["base model", "params"] == sum(p.numel() for p in fresh().parameters())
    assert bool(table.loc["lora", "active"]) and not bool(table.loc["seq_bn", "active"])


@pytest.mark.parametrize("method", ["prefix", "mam"])
def test_prefix_tuning_switches_to_eager_attention_and_learns(tok, method):
    """Under SDPA, adapters 1.3.0 masks its own prefix out when a 4D mask is built (padding here): the prefix
    would get exactly zero gradient. add_adapter switches to eager attention, where the prefix gets gradients and
    padding stays correct (the short sample's logits equal its logits alone)."""
    model, _ = load_model("tiny", bits=4)
    assert model.config._attn_implementation == "sdpa"
    with pytest.warns(UserWarning, match="switching attention from 'sdpa' to 'eager'"):
        add_adapter(model, method)
    assert model.config._attn_implementation == "eager"
    texts = ["Ada lives in Oakdale.", "Ben is a baker in Riverton and likes bread."]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model(**batch, labels=labels, use_cache=False).loss.backward()
    prefix = [p for n, p in model.named_parameters() if p.requires_grad and "prefix" in n]
    assert prefix and all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix)
    model.eval()
    with torch.no_grad():
        alone = model(**tok(texts[:1], return_tensors="pt")).logits[0]
        padded = model(**batch).logits[0, : alone.shape[0]]
    assert torch.allclose(alone, padded, atol=1e-4)


def test_sdpa_prefix_bug_is_what_we_prevent(tok):
    """The adapters 1.3.0 behaviour add_adapter works around: under SDPA the prefix gets no gradient at all.
    (If this starts failing, adapters fixed it and the eager switch can go.)"""
    model, _ = load_model("tiny", bits=4)
    adapters.init(model)
    model.add_adapter("p", config=adapter_config("prefix"))
    model.train_adapter("p")
    model.train()
    batch = tok(["Ada lives in Oakdale.", "Ben is a baker in Riverton and likes bread."], return_tensors="pt",
                padding=True)  # different lengths: padding, so transformers builds a 4D mask
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model(**batch, labels=labels, use_cache=False).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_cached_generation_equals_uncached_after_adapters_init(tok, method):
    """adapters 1.3.0 drops transformers 4.57's KV cache (past_key_values vs past_key_value): add_adapter hands it
    over, so generate() with the cache gives the same scores as without (without the fix they differ by ~16)."""
    model, _ = load_model("tiny", bits=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add_adapter(model, method)
    model.eval()
    inputs = tok(["Ada lives in", "three plus four is"], return_tensors="pt", padding=True, padding_side="left")
    runs = []
    with torch.no_grad():
        for cache in (True, False):
            runs.append(model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                       use_cache=cache, output_scores=True, return_dict_in_generate=True))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert max((a - b).abs().max().item() for a, b in zip(runs[0].scores, runs[1].scores)) < 1e-4


def test_turning_checkpointing_off_removes_the_input_grad_hooks():
    model, _ = load_model("tiny", bits=4)
    add_adapter(model, "lora", gradient_checkpointing=True)
    embedding = model.get_input_embeddings()
    assert any(getattr(h, "__name__", "") == "make_inputs_require_grads" for h in embedding._forward_hooks.values())
    from qadapter_utils.methods import _gradient_checkpointing

    _gradient_checkpointing(model, False)
    assert not model.is_gradient_checkpointing
    assert not any(getattr(h, "__name__", "") == "make_inputs_require_grads"
                   for h in embedding._forward_hooks.values())
    out = embedding(torch.tensor([[1, 2, 3]]))
    assert not out.requires_grad


def test_add_fusion_trains_only_fp32_fusion_layers_on_a_half_precision_base():
    model, tok = load_model("tiny", bits=4, compute_dtype=torch.bfloat16)
    for task in ("home", "work"):
        add_adapter(model, "seq_bn", name=task)
    with pytest.raises(AdapterMethodError, match="two or more"):
        add_fusion(model, "home")
    with pytest.raises(AdapterMethodError, match="missing: 'play'"):
        add_fusion(model, "home", "play")
    fusion = add_fusion(model, "home", "work")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("adapter_fusion_layer.home,work" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32} and model.training
    batch = tok(["Ada lives in Ashford."], return_tensors="pt")
    out = model(**batch, labels=batch.input_ids)   # no autocast: the cast hooks bridge bf16 and fp32
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert model.active_adapters == fusion


def test_add_fusion_only_where_the_fused_adapters_sit():
    model, tok = load_model("tiny", bits=4)
    last = model.config.num_hidden_layers - 1
    for task in ("home", "work"):
        add_adapter(model, "seq_bn", name=task, leave_out=list(range(last)))   # the last layer only
    import adapters.methods.modeling as modeling

    built = []
    original = modeling.BertFusion.__init__
    modeling.BertFusion.__init__ = lambda self, *a, **k: built.append(1) or original(self, *a, **k)
    try:
        add_fusion(model, "home", "work")
    finally:
        modeling.BertFusion.__init__ = original
    assert len(built) == 1, "a fusion layer is not even created where no fused adapter sits (time on a 7B)"
    assert all("add_fusion_layer" not in vars(m) for m in model.modules()), "the skip is undone"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    hidden = model.config.hidden_size
    assert {n.split(".")[2] for n in trainable} == {str(last)}
    assert sum(p.numel() for p in trainable.values()) == 3 * hidden * hidden + 2 * hidden  # query, key, value
    batch = tok(["Ada lives in Ashford."], return_tensors="pt")
    model(**batch, labels=batch.input_ids).loss.backward()
    assert all(p.grad is not None for p in trainable.values())
