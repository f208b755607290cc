"""qadapter_utils.merge: the merged model reproduces the adapter-on quantized model; adapters' own merge_adapter
does not on a 4-bit base; what cannot be merged is refused."""
import bitsandbytes as bnb
import pytest
import torch

from qadapter_utils.merge import MergeError, merge_lora, merged_weight
from qadapter_utils.methods import add_adapter
from qadapter_utils.models import load_model
from qadapter_utils.weights import dequantized_weight

# Tolerances (max |difference| of logits, whose magnitude is ~15 on the tiny model). 4-bit, and 8-bit in train
# mode: both compute x @ dequant(W).T in fp32, so only float rounding differs (measured: ~1e-5). 8-bit in eval
# mode: LLM.int8() also rounds the activations to int8 (and fp16), which a merged float model does not
# (measured: max ~0.3, mean ~0.03); the merge itself is exact at the weight level (checked below).
ATOL_4BIT = 1e-4
ATOL_8BIT_EVAL = 0.5


def _trained_looking(model, name, seed=0):
    """Give the adapter non-trivial weights (LoRA's B starts at zero, (IA)^3 at one: both would be no-ops)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, param in model.named_parameters():
            if param.requires_grad and name in path.split("."):
                param.add_(0.05 * torch.randn(param.shape, generator=gen))


def _adapter_model(bits, method):
    model, tok = load_model("tiny", bits=bits)
    name = add_adapter(model, method)
    _trained_looking(model, name)
    return model, name


def _logits(model, x):
    # train mode + no_grad: bitsandbytes keeps its canonical 4-bit layout (on CPUs with AVX512-BF16 an eval-mode
    # forward repacks it into a bf16 kernel layout, which would add bf16 rounding to the comparison)
    model.train()
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


X = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["lora_all", "ia3"])
def test_merge_matches_adapter_on_4bit(method):
    model, name = _adapter_model(4, method)
    reference = _logits(model, X)
    merged = merge_lora(model, name)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert merged.dtype == torch.float32 and not hasattr(merged, "adapters_config") and not merged.training
    with torch.no_grad():
        out = merged(input_ids=X).logits
    assert (out - reference).abs().max().item() < ATOL_4BIT
    # the caller's model is untouched and its adapter still active
    assert torch.equal(_logits(model, X), reference)
    model.set_active_adapters(None)
    assert (_logits(model, X) - reference).abs().max().item() > 0.1  # the adapter really changed the logits


def test_merge_on_8bit():
    model, name = _adapter_model(8, "lora")
    layer = model.model.layers[1].self_attn.q_proj
    lora = layer.loras[name]
    weight, _ = merged_weight(layer, name)
    expected = dequantized_weight(layer).float() + lora.scaling * (lora.lora_B @ lora.lora_A).detach()
    assert torch.equal(weight, expected)  # the merge itself is exact at the weight level
    merged = merge_lora(model, name)
    with torch.no_grad():
        out = merged(input_ids=X).logits
    # train mode: bitsandbytes' CPU 8-bit path dequantizes the weight and multiplies in fp32 -> float rounding only
    assert (out - _logits(model, X)).abs().max().item() < ATOL_4BIT
    # eval mode: LLM.int8() also rounds the activations to int8; the merged model differs from it by about as
    # much as the 8-bit model differs from its own dequantized weights
    model.eval()
    with torch.no_grad():
        int8 = model(input_ids=X, use_cache=False).logits
        model.set_active_adapters(None)
        base_int8 = model(input_ids=X, use_cache=False).logits
        model.train()
        base_dequantized = model(input_ids=X, use_cache=False).logits
    own_rounding = (base_int8 - base_dequantized).abs().max().item()
    assert 0 < (out - int8).abs().max().item() < max(ATOL_8BIT_EVAL, 2 * own_rounding)
    assert (out.argmax(-1) == int8.argmax(-1)).float().mean().item() > 0.9


def test_adapters_merge_adapter_breaks_a_4bit_base():
    model, name = _adapter_model(4, "lora")
    reference = _logits(model, X)
    model.merge_adapter(name)  # adapters 1.3.0: writes float data into the 4-bit Params4bit
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype != torch.uint8 and getattr(weight, "bnb_quantized", False)
    try:
        wrong = _logits(model, X)
    except RuntimeError:  # on the CPU the 4-bit kernel rejects the float data
        return
    assert (wrong - reference).abs().max().item() > 1.0


def test_unmergeable_adapters_are_refused():
    model, tok = load_model("tiny", bits=4)
    add_adapter(model, "seq_bn")
    with pytest.raises(MergeError, match="only LoRA and"):
        merge_lora(model, "seq_bn")
    with pytest.raises(MergeError, match="no adapter named"):
        merge_lora(model, "missing")
