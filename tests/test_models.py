"""load_model / default_model: the embedded model, quantized loading, random real-scale shapes, and errors."""
import json

import bitsandbytes as bnb
import pytest
import torch

import qadapter_utils as qu
from qadapter_utils import models
from qadapter_utils.models import ModelLoadError, load_model


def _linears(model):
    return [m for name, m in model.named_modules() if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"))]


def test_tiny_full_precision_on_cpu():
    model, tok = load_model("tiny")
    assert all(type(m) is torch.nn.Linear for m in _linears(model))
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token == tok.unk_token == "<unk>"  # Llama 2 style: no pad token of its own
    assert tok("Ada lives in").input_ids[0] == tok.bos_token_id == 1


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_tiny_4bit_layers_are_linear4bit(quant_type, double_quant):
    model, _ = load_model("tiny", bits=4, quant_type=quant_type, double_quant=double_quant)
    layers = _linears(model)
    assert len(layers) == 4 * 7 and all(isinstance(m, bnb.nn.Linear4bit) for m in layers)
    state = layers[0].weight.quant_state
    assert state.quant_type == quant_type and (state.nested == double_quant)
    assert layers[0].compute_dtype == torch.float32
    assert type(model.lm_head) is torch.nn.Linear  # kept in higher precision


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_quantizing_where_read_gives_transformers_bytes(quant_type, double_quant, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    config = models.bnb_config(4, quant_type, double_quant, torch.float32)
    stock_method = Bnb4BitHfQuantizer.create_quantized_param
    stock = AutoModelForCausalLM.from_pretrained(models.TINY_DIR, quantization_config=config, dtype=torch.float32)
    calls = []
    with models.quantize_4bit_where_read():
        patched_method = Bnb4BitHfQuantizer.create_quantized_param
        monkeypatch.setattr(Bnb4BitHfQuantizer, "create_quantized_param",
                            lambda *a, **k: calls.append(1) or patched_method(*a, **k))
        ours = AutoModelForCausalLM.from_pretrained(models.TINY_DIR, quantization_config=config, dtype=torch.float32)
        monkeypatch.undo()
    assert Bnb4BitHfQuantizer.create_quantized_param is stock_method  # restored on leaving
    assert patched_method is not stock_method and len(calls) == len(_linears(ours)) == 4 * 7

    def state_tensors(state):
        nested = state.state2 if state.nested else None
        return [state.absmax, state.code] + ([nested.absmax, nested.code, state.offset] if nested else [])

    for a, b in zip(_linears(stock), _linears(ours)):
        assert type(a.weight) is type(b.weight) and a.weight.bnb_quantized and b.weight.bnb_quantized
        assert torch.equal(a.weight.data, b.weight.data)  # the packed 4-bit codes
        sa, sb = a.weight.quant_state, b.weight.quant_state
        assert (sa.shape, sa.blocksize, sa.quant_type, sa.dtype, sa.nested) == (sb.shape, sb.blocksize,
                                                                                 sb.quant_type, sb.dtype, sb.nested)
        assert all(torch.equal(x, y) for x, y in zip(state_tensors(sa), state_tensors(sb)))
    batch = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(stock(batch).logits, ours(batch).logits)


def test_tiny_8bit_layers_are_linear8bitlt():
    model, _ = load_model("tiny", bits=8)
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in _linears(model))
    assert _linears(model)[0].weight.dtype == torch.int8


def test_quantized_tiny_still_knows_its_world():
    """4-bit NF4 keeps most of what the model learned: compare next-token loss with full precision."""
    from qadapter_utils.tiny.corpus import corpus

    texts = corpus("test", n_paragraphs=20)
    losses = {}
    for bits in (None, 4):
        model, tok = load_model("tiny", bits=bits)
        batch = tok(texts, return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        with torch.no_grad():
            losses[bits] = model(**batch, labels=labels).loss.item()
    assert losses[None] < 1.5  # perplexity < 4.5 on a 512-token vocabulary
    assert losses[None] < losses[4] < losses[None] + 0.5


def test_tiny_build_stats_show_learning():
    stats = json.loads((models.TINY_DIR / "build_stats.json").read_text())
    assert stats["uniform_perplexity"] == 512
    assert stats["validation_perplexity"] < 0.01 * stats["uniform_perplexity"]


def test_random_tiny_shapes_and_4bit(tmp_path, monkeypatch):
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path))
    model, tok = load_model("random:tiny", bits=4)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    mistral, _ = load_model("random:mistral-tiny", bits=8)
    assert type(mistral).__name__ == "MistralForCausalLM"
    assert mistral.config.num_key_value_heads == 2 and mistral.config.num_attention_heads == 4
    assert mistral.model.layers[0].self_attn.k_proj.out_features == 2 * 32
    assert isinstance(mistral.model.layers[0].self_attn.k_proj, bnb.nn.Linear8bitLt)


@pytest.mark.parametrize("shape,params", [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
                                          ("llama2-70b", 68_976_648_192)])
def test_real_scale_shapes_on_meta_device(shape, params):
    """The published parameter counts of Llama 2, built on the meta device (no memory, no download)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(models.model_config(shape))
    assert sum(p.numel() for p in model.parameters()) == params


def test_random_7b_goes_through_bitsandbytes_config(monkeypatch, tmp_path):
    """load_model('random:llama2-7b', bits=4) asks from_pretrained for a 4-bit NF4 + DQ load of a local folder
    (the real load needs a GPU; here we stop right before it)."""
    seen = {}

    def fake_checkpoint(shape, dtype):
        seen["shape"] = shape
        return tmp_path

    def fake_from_pretrained(path, quantization_config=None, dtype=None, device_map=None):
        seen.update(path=path, q=quantization_config, dtype=dtype)
        raise RuntimeError("stop here")

    import transformers

    monkeypatch.setattr(models, "random_checkpoint", fake_checkpoint)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(RuntimeError, match="stop here"):
        load_model("random:llama2-7b", bits=4)
    assert seen["shape"] == "llama2-7b" and seen["path"] == str(tmp_path)
    assert seen["q"].load_in_4bit and seen["q"].bnb_4bit_quant_type == "nf4" and seen["q"].bnb_4bit_use_double_quant


# ---- errors a user will see ---------------------------------------------------------------------------------

GIB = 2**30


def test_weights_that_cannot_fit_the_gpu_are_refused_before_loading(monkeypatch, tmp_path):
    """Llama-2-13B unquantized on a T4 (15 GiB): from_pretrained would run out of memory halfway through loading;
    load_model refuses first, with the numbers and what to do (here: 4-bit, 6.7 GiB, fits)."""
    import transformers

    models.model_config("llama2-13b").save_pretrained(tmp_path)  # config only, no weights
    monkeypatch.setattr(models, "random_checkpoint", lambda shape, dtype: tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(models, "_free_gpu_bytes", lambda device: int(14.5 * GIB))
    reached = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: reached.append(k) or (_ for _ in ()).throw(RuntimeError("loading")))
    with pytest.raises(ModelLoadError) as err:
        load_model("random:llama2-13b", bits=None, compute_dtype="fp16")
    message = str(err.value)
    assert "needs 24.2 GiB for its weights alone" in message and "GPU 0 (Tesla T4) has 14.5 GiB free" in message
    assert "bits=4: 6.7 GiB)" in message and "Nothing was loaded" in message and not reached
    with pytest.raises(RuntimeError, match="loading"):  # 4-bit fits: the load goes ahead
        load_model("random:llama2-13b", bits=4, compute_dtype="fp16")
    assert reached


def test_weights_fit_check_suggests_sharding_when_even_4bit_is_too_big():
    config = models.model_config("llama2-70b")
    with pytest.raises(ModelLoadError, match=r"bits=4: 33.9 GiB, still too much\).*sharded across them"):
        models._check_weights_fit("llama2-70b", config, 8, "nf4", True, torch.bfloat16, 24 * GIB, "GPU 0")
    models._check_weights_fit("llama2-70b", config, 4, "nf4", True, torch.bfloat16, 40 * GIB, "GPU 0")  # fits


@pytest.mark.parametrize("bits", [3, 16, "4"])
def test_unsupported_bits(bits):
    with pytest.raises(ModelLoadError, match=r"bits=.* is not supported: .*bits=4.*bits=8.*bits=None"):
        load_model("tiny", bits=bits)


def test_unsupported_quant_type():
    with pytest.raises(ModelLoadError, match="quant_type='int4' is not supported: use 'nf4'"):
        load_model("tiny", bits=4, quant_type="int4")


def test_unknown_shape():
    with pytest.raises(ModelLoadError, match=r"unknown shape 'llama2-8b'.*llama2-7b"):
        load_model("random:llama2-8b")


def test_unknown_name_is_neither_path_nor_hub_id():
    with pytest.raises(ModelLoadError, match="unknown model 'not a model!'.*'tiny'.*random:"):
        load_model("not a model!")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="folder without config.json"):
        load_model(str(tmp_path))


def test_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"could not download 'meta-llama/Llama-2-7b-hf': no network.*'tiny'"):
        load_model("meta-llama/Llama-2-7b-hf", bits=4)


def test_gated_repo_without_login(monkeypatch):
    import transformers
    from huggingface_hub.errors import GatedRepoError

    def gated(name, *args, **kwargs):
        raise OSError(f"You are trying to access a gated repo.\nMake sure to have access to it at "
                      f"https://huggingface.co/{name}.\n401 Client Error.") from GatedRepoError("401", response=None)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", gated)
    with pytest.raises(ModelLoadError, match=r"gated repository.*huggingface-cli login.*NousResearch/Llama-2-7b-hf"):
        load_model("meta-llama/Llama-2-7b-hf", bits=4)


def test_unknown_hub_repo(monkeypatch):
    import transformers

    def missing(name, *args, **kwargs):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on "
                      f"'https://huggingface.co/models'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", missing)
    with pytest.raises(ModelLoadError, match=r"unknown model 'meta-llama/Llama-3-typo': no such repository"):
        load_model("meta-llama/Llama-3-typo")


def test_bad_compute_dtype():
    with pytest.raises(ModelLoadError, match="compute_dtype='float8' is not supported"):
        load_model("tiny", bits=4, compute_dtype="float8")


# ---- default_model --------------------------------------------------------------------------------------------

def test_default_model_env_var_wins(monkeypatch, capsys):
    monkeypatch.setenv("QADAPTER_MODEL", "random:llama2-7b")
    assert qu.default_model() == "random:llama2-7b"
    assert "set by $QADAPTER_MODEL" in capsys.readouterr().out


def test_default_model_without_gpu_is_tiny(monkeypatch, capsys):
    monkeypatch.delenv("QADAPTER_MODEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert qu.default_model() == "tiny"
    assert "no CUDA GPU" in capsys.readouterr().out


@pytest.mark.parametrize("gib,expected", [(15.0, models.LLAMA2_7B), (80.0, models.LLAMA2_7B), (8.0, "tiny")])
def test_default_model_with_gpu(monkeypatch, gib, expected):
    class Props:
        total_memory = int(gib * 2**30)

    monkeypatch.delenv("QADAPTER_MODEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    assert qu.default_model(verbose=False) == expected
