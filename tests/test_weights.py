"""Tests for qadapter_utils.weights: footprint totals against get_memory_footprint, dequantized_weight against
bitsandbytes' own dequantization (fresh layers, CPU-repacked layers, 8-bit), and that nothing is modified."""
import copy
import warnings

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu
from bitsandbytes.nn import Linear4bit, Linear8bitLt

from qadapter_utils.models import load_model
from qadapter_utils.weights import dequantized_weight, footprint

warnings.filterwarnings("ignore", message="MatMul8bitLt")

VARIANTS = [("tiny", None, "nf4", True), ("tiny", 8, "nf4", True), ("tiny", 4, "nf4", True),
            ("tiny", 4, "nf4", False), ("tiny", 4, "fp4", True), ("tiny", 4, "fp4", False),
            ("random:mistral-tiny", 4, "nf4", True), ("random:mistral-tiny", 8, "nf4", True)]


def load(name="tiny", bits=None, quant_type="nf4", double_quant=True):
    return load_model(name, bits=bits, quant_type=quant_type, double_quant=double_quant)[0]


@pytest.fixture(scope="module")
def fp32_weights():
    model = load()
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("name,bits,quant_type,double_quant", VARIANTS)
def test_footprint_total_equals_get_memory_footprint(name, bits, quant_type, double_quant):
    model = load(name, bits, quant_type, double_quant)
    for by in ("kind", "module"):
        table = footprint(model, by=by)
        assert table.loc["total", "bytes"] == model.get_memory_footprint()
        assert table.drop(index="total")["bytes"].sum() == model.get_memory_footprint()
        assert table.loc["total", "params"] == sum(p.numel() for p in load(name).parameters())
    table = footprint(model)
    quantized = table[table["quantized"]].drop(index="total", errors="ignore")
    if bits is None:
        assert quantized.empty and table.loc["total", "quant_const_bytes"] == 0
        return
    kind = "Linear8bitLt (int8)" if bits == 8 else \
        f"Linear4bit ({quant_type}{' + double quant' if double_quant else ''})"
    assert list(quantized.index) == [kind]
    n_linear = 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down
    assert quantized.loc[kind, "modules"] == n_linear
    assert quantized.loc[kind, "bits/param"] == bits
    # embeddings, lm_head and norms stay in the compute dtype (fp32 on the CPU)
    kept = table[~table["quantized"]]
    assert {"Embedding (float32)", "lm_head (Linear, float32)"} <= set(kept.index)
    assert any(k.startswith(("LlamaRMSNorm", "MistralRMSNorm")) for k in kept.index)
    assert (kept.drop(index=[k for k in kept.index if "Rotary" in k])["bits/param"] == 32).all()


def test_quant_constants_match_the_block_layout():
    """4-bit: one absmax per 64 weights (fp32, or uint8 with double quant plus one fp32 scale per 256 absmax and an
    fp32 offset) and the code books (16 fp32 values; 256 more for the second level). 8-bit: one fp32 scale per row."""
    import math

    for double_quant in (False, True):
        table = footprint(load("tiny", 4, "nf4", double_quant), by="module")
        for path, row in table[table["quantized"]].drop(index="total").iterrows():
            blocks = math.ceil(row["params"] / 64)
            expected = blocks * 4 + 16 * 4 if not double_quant else \
                blocks + math.ceil(blocks / 256) * 4 + 4 + 16 * 4 + 256 * 4
            assert row["quant_const_bytes"] == expected, path
    table = footprint(load("tiny", 8), by="module")
    model = load("tiny")
    for path, row in table[table["quantized"]].drop(index="total").iterrows():
        assert row["quant_const_bytes"] == 4 * model.get_submodule(path).out_features


def test_footprint_bad_grouping():
    with pytest.raises(ValueError, match="by='layer'"):
        footprint(load(), by="layer")


def _snapshot(layer):
    weight = layer.weight
    qs = getattr(weight, "quant_state", None)
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in vars(qs).items()} if qs is not None else {}
    return weight.data.clone(), tuple(weight.data.shape), state


def _assert_unchanged(layer, snap):
    data, shape, state = snap
    assert tuple(layer.weight.data.shape) == shape and torch.equal(layer.weight.data, data)
    qs = getattr(layer.weight, "quant_state", None)
    for key, value in state.items():
        now = getattr(qs, key)
        assert (torch.equal(now, value) if torch.is_tensor(value) else now == value or key == "state2"), key


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_dequantized_weight_4bit_equals_bitsandbytes(fp32_weights, quant_type, double_quant):
    model = load("tiny", 4, quant_type, double_quant)
    for path, layer in model.named_modules():
        if not isinstance(layer, Linear4bit):
            continue
        snap = _snapshot(layer)
        weight = dequantized_weight(layer)
        expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(weight, expected), path
        assert weight.shape == fp32_weights[path].shape and weight.dtype == torch.float32
        _assert_unchanged(layer, snap)
        if layer.in_features % layer.weight.quant_state.blocksize:
            continue  # bitsandbytes' AVX-512 CPU kernel mis-dequantizes these: see the test below
        # a 4-bit approximation of the original weight: within half the widest step of the code (NF4 -1..-0.70,
        # FP4 0.67..1) times each block's absmax, plus the 8-bit rounding of absmax under double quant
        original = fp32_weights[path].reshape(-1, 64)
        absmax = original.abs().amax(1)
        qs = layer.weight.quant_state
        stored = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
        bound = {"nf4": 0.152, "fp4": 0.167}[quant_type] * absmax + (stored - absmax).abs() + 1e-6
        error = (weight.reshape(-1, 64) - original).abs().amax(1)
        assert error.max() > 0 and (error <= bound).all(), path


def _row_blocked(data, state) -> torch.Tensor:
    """What bitsandbytes 0.50.2's AVX-512 CPU kernel computes for a 2-D [m, n] 4-bit weight: the codes of the
    flattened tensor, but the scale of weight (i, j) taken from block i * (n // blocksize) + j // blocksize, as if
    every row started a new block."""
    m, n = state.shape
    flat = data.reshape(-1)
    codes = state.code[torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1).long()].reshape(m, n)
    rows, cols = torch.arange(m)[:, None], torch.arange(n)[None, :]
    index = (rows * (n // state.blocksize) + cols // state.blocksize).clamp(max=state.absmax.numel() - 1)
    return codes * state.absmax[index]


def test_bitsandbytes_cpu_dequantization_is_flat_blocks_or_the_known_avx512_row_bug():
    """quantize_4bit blocks the flattened tensor. bitsandbytes 0.50.2's CPU kernel on processors with AVX-512
    dequantizes a 2-D [m, n] weight block-by-row, so when n is not a multiple of the block size (352 = 5.5 x 64)
    the scales land on the wrong weights; other CPUs (and CUDA) compute the flat blocks. This test holds on both
    kinds of CPU and names which one ran: bitsandbytes' 2-D result is exactly one of the two, the flat result is
    always right, and dequantized_weight returns what the layer computes with (the test below) either way."""
    weight = torch.randn(128, 352, generator=torch.Generator().manual_seed(0))
    data, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    as_2d = bnb.functional.dequantize_4bit(data, state)
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([weight.numel()])
    as_flat = bnb.functional.dequantize_4bit(data, flat_state).reshape(weight.shape)
    block_absmax = weight.reshape(-1, 64).abs().amax(1, keepdim=True)
    assert ((as_flat - weight).reshape(-1, 64).abs() / block_absmax).max() < 0.17  # flat blocks: correct
    row_blocked = _row_blocked(data, state)
    assert ((row_blocked - weight).reshape(-1, 64).abs() / block_absmax).max() > 0.5  # the two can be told apart
    kernel = "flat (correct)" if torch.equal(as_2d, as_flat) else "row-blocked (AVX-512 bug)" \
        if torch.equal(as_2d, row_blocked) else "neither"
    assert kernel != "neither", "bitsandbytes' CPU dequantization changed: update this test and the notebooks' note"


def test_dequantized_weight_matches_the_layer_forward():
    """On every CPU (AVX-512 kernel or not), also for rows that are not whole blocks: dequantized_weight is the
    matrix the layer multiplies with."""
    from bitsandbytes.nn import Params4bit

    model = load("tiny", 4)
    odd = Linear4bit(352, 128, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    odd.weight = Params4bit(torch.randn(128, 352, generator=torch.Generator().manual_seed(0)),
                            requires_grad=False, quant_type="nf4", blocksize=64)
    for layer in (model.model.layers[0].mlp.up_proj, model.model.layers[0].mlp.down_proj, odd.to("cpu")):
        layer.train()  # the CPU repacking only happens in eval mode
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ dequantized_weight(layer).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantized_weight_undoes_cpu_repacking(double_quant):
    """bitsandbytes repacks a Linear4bit for the CPU at its first eval forward on AVX512-BF16 processors; the
    repacked layer stores its block scales in bf16. Repack a copy exactly as bitsandbytes does and compare with
    the fresh, never-run layer: equal up to the bf16 rounding of absmax (relative 2**-8)."""
    model = load("tiny", 4, "nf4", double_quant)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        fresh = model.get_submodule(path)
        expected = bnb.functional.dequantize_4bit(fresh.weight.data, fresh.weight.quant_state)
        repacked = copy.deepcopy(fresh)
        repacked.weight.data, repacked.weight.quant_state = _convert_weight_packed_for_cpu(
            repacked.weight.data, repacked.weight.quant_state)
        assert repacked.weight.quant_state.packing_format_for_cpu
        assert tuple(repacked.weight.data.shape) == (fresh.out_features, fresh.in_features // 2)
        snap = _snapshot(repacked)
        weight = dequantized_weight(repacked)
        assert weight.shape == expected.shape
        assert (weight - expected).abs().le(expected.abs() * 2**-8 + 1e-12).all(), path
        assert not torch.equal(weight, expected)  # really went through the bf16 scales
        _assert_unchanged(repacked, snap)
        assert repacked.weight.quant_state.packing_format_for_cpu


def test_dequantized_weight_8bit_equals_bitsandbytes(fp32_weights):
    model = load("tiny", 8)
    for path, layer in model.named_modules():
        if not isinstance(layer, Linear8bitLt):
            continue
        data = layer.weight.data.clone()
        weight = dequantized_weight(layer)
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(fp32_weights[path].half())
        assert torch.equal(weight, bnb.functional.int8_vectorwise_dequant(cb, scb)), path
        assert torch.equal(layer.weight.data, data)
        assert (weight - fp32_weights[path]).abs().max() <= fp32_weights[path].abs().max() / 127


def test_dequantized_weight_8bit_after_forward_and_with_lora(fp32_weights):
    """After a forward bitsandbytes moves the scales from the weight to the layer's state; adapters' LoRA wrapper
    is still a Linear8bitLt."""
    from qadapter_utils.methods import add_adapter

    model, tok = load_model("tiny", bits=8)
    before = dequantized_weight(model.model.layers[0].self_attn.q_proj)
    with torch.no_grad():
        model(**tok(["Ada"], return_tensors="pt"))
    add_adapter(model, "lora")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "LoRALinear8bitLt"
    assert torch.equal(dequantized_weight(layer), before)


def test_dequantized_weight_plain_linear_is_a_copy():
    layer = torch.nn.Linear(4, 3)
    weight = dequantized_weight(layer)
    assert torch.equal(weight, layer.weight) and not weight.requires_grad
    weight.zero_()
    assert layer.weight.abs().sum() > 0
    assert dequantized_weight(layer, dtype=torch.float16).dtype == torch.float16


def test_dequantized_weight_rejects_non_linear():
    with pytest.raises(TypeError, match="LayerNorm is not a linear layer"):
        dequantized_weight(torch.nn.LayerNorm(4))
