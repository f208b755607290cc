"""Loading Llama 2 (or the embedded tiny model) in full precision, 8-bit or 4-bit, in one call.

    model, tokenizer = load_model("tiny", bits=4)                        # embedded, no network
    model, tokenizer = load_model("meta-llama/Llama-2-7b-hf", bits=4)     # hub id or local path
    model, tokenizer = load_model("random:llama2-7b", bits=4)            # real shape, random weights

Introduced in notebooks/00_setup.ipynb and notebooks/02_loading_quantized.ipynb. Needs env (default compute
dtype), quant (weight_memory: the fit check before loading; DTYPES) and weights (keep_4bit_layers_trainable).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch

try:  # inside the qadapter_utils package
    from .env import default_compute_dtype
    from .quant import DTYPES, weight_memory
    from .weights import keep_4bit_layers_trainable
except ImportError:  # copied next to its siblings (the copy-alone rule: qadapter_utils/__init__.py)
    from env import default_compute_dtype
    from quant import DTYPES, weight_memory
    from weights import keep_4bit_layers_trainable

TINY_DIR = Path(__file__).parent / "tiny" / "model"
LLAMA2_7B = "meta-llama/Llama-2-7b-hf"
# An ungated copy of the same weights, for users without access to Meta's repository.
LLAMA2_7B_UNGATED = "NousResearch/Llama-2-7b-hf"
MIN_GPU_GIB_FOR_7B = 14.0  # 7B QLoRA training needs ~6-10 GiB; a T4 (15 GiB) qualifies, smaller GPUs do not

_LLAMA2_COMMON = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# Architecture shapes for "random:<shape>" (and for the memory estimator): (architecture, config keyword arguments)
SHAPES: dict[str, tuple[str, dict]] = {
    "llama2-7b": ("llama", dict(_LLAMA2_COMMON, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32)),
    "llama2-13b": ("llama", dict(_LLAMA2_COMMON, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40)),
    "llama2-70b": ("llama", dict(_LLAMA2_COMMON, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8)),
    # Mistral-7B-v0.1's shape: grouped-query attention (8 KV heads for 32 query heads), a wider MLP
    "mistral-7b": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", sliding_window=None,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    "tiny": ("llama", dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                           rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2)),
    # A second decoder with grouped-query attention (2 KV heads for 4 query heads), for compatibility checks.
    "mistral-tiny": ("mistral", dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", sliding_window=None,
                                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
}


class ModelLoadError(ValueError):
    """Raised by load_model with a message that says what to do instead."""


def model_config(shape: str):
    """The transformers config of a named shape (see SHAPES), without any weights."""
    if shape not in SHAPES:
        raise ModelLoadError(f"unknown shape {shape!r}: choose one of {sorted(SHAPES)}")
    arch, kwargs = SHAPES[shape]
    if arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(**kwargs)
    from transformers import LlamaConfig

    return LlamaConfig(**kwargs)


def default_model(verbose: bool = True) -> str:
    """The model the notebooks use: $QADAPTER_MODEL if set; Llama-2-7B on a CUDA GPU with at least 14 GiB;
    otherwise the embedded "tiny" model. Prints which and why. (00_setup)"""
    name, why = _default_model_and_reason()
    if verbose:
        print(f"model: {name}  ({why})")
    return name


def _default_model_and_reason() -> tuple[str, str]:
    if os.environ.get("QADAPTER_MODEL"):
        return os.environ["QADAPTER_MODEL"], "set by $QADAPTER_MODEL"
    if torch.cuda.is_available():
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        if gib >= MIN_GPU_GIB_FOR_7B:
            return LLAMA2_7B, f"a CUDA GPU with {gib:.0f} GiB is present; set QADAPTER_MODEL=tiny to run fast"
        return "tiny", f"the GPU has {gib:.0f} GiB, under the {MIN_GPU_GIB_FOR_7B:.0f} GiB Llama-2-7B needs"
    return "tiny", "no CUDA GPU: the embedded tiny Llama 2 runs on the CPU; set QADAPTER_MODEL to override"


def bnb_config(bits: int | None, quant_type: str = "nf4", double_quant: bool = True, compute_dtype=None,
               quant_storage=None):
    """The `BitsAndBytesConfig` for `bits` (None for no quantization). quant_storage: the dtype the packed 4-bit
    codes are stored in (default uint8); FSDP needs it equal to the compute dtype so that it can shard the
    quantized weights with the rest (08_multi_gpu). (02_loading_quantized)"""
    _check_quant_args(bits, quant_type)
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    compute_dtype = _as_dtype(compute_dtype) or default_compute_dtype()
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=_as_dtype(quant_storage) or torch.uint8)


def load_model(name: str = "tiny", bits: int | None = None, quant_type: str = "nf4", double_quant: bool = True,
               compute_dtype=None, device_map=None, quant_storage=None):
    """Load `name` as (model, tokenizer), quantized through `BitsAndBytesConfig` when `bits` is 4 or 8.

    name: "tiny" (embedded, no network); a hub id or local path; or "random:<shape>" with a shape from SHAPES
    (the real architecture with random weights, no download; tokenized with the tiny tokenizer).
    compute_dtype: None picks bf16 on GPUs that support it, fp16 on other GPUs (Colab's T4), fp32 on the CPU.
    device_map: default the whole model on GPU $LOCAL_RANK (0 outside a distributed launch), else the CPU. On one
    GPU, weights that cannot fit its free memory raise ModelLoadError before anything is downloaded or allocated.
    Non-quantized parts (embeddings, norms, lm_head) are kept in compute_dtype. The model is returned in eval
    mode, as `from_pretrained` returns it: call `model.train()` before a hand-written training loop. 4-bit layers
    are kept out of bitsandbytes' AVX512-BF16 inference repacking on the CPU, so every CPU computes them with the
    same kernel and they stay trainable after an evaluation (weights.keep_4bit_layers_trainable). A truncated
    or unreadable weights file raises ModelLoadError naming it.
    (00_setup, 02_loading_quantized)
    """
    _check_quant_args(bits, quant_type)
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"model name must be a non-empty string, got {name!r}: use 'tiny', a hub id such as "
                             f"{LLAMA2_7B!r}, a local folder, or 'random:<shape>' with a shape from {sorted(SHAPES)}")
    dtype = _as_dtype(compute_dtype) or default_compute_dtype()
    path = _resolve(name, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantization_config = bnb_config(bits, quant_type, double_quant, dtype, quant_storage)
    if device_map is None:  # under a distributed launcher each process takes its own GPU
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else {"": "cpu"}
    gpu = device_map.get("") if isinstance(device_map, dict) and len(device_map) == 1 else None
    if isinstance(gpu, int) and torch.cuda.is_available():  # the whole model on one GPU: will its weights fit?
        from transformers import AutoConfig

        _check_weights_fit(name, AutoConfig.from_pretrained(path), bits, quant_type, double_quant, dtype,
                           _free_gpu_bytes(gpu), f"GPU {gpu} ({torch.cuda.get_device_name(gpu)})")
    try:
        with quantize_4bit_where_read():
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config, dtype=dtype,
                                                         device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(TINY_DIR if name.startswith("random:") else path)
    except OSError as err:  # config resolved, but weights or tokenizer could not be fetched
        raise _hub_error(name, err) from err
    except Exception as err:
        if "safetensor" in type(err).__name__.lower() or "header" in str(err).lower():
            raise _unreadable_weights(name, path, err) from err
        raise
    if tokenizer.pad_token is None:  # Llama 2 has no padding token; <unk> is the usual stand-in
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if bits == 4:  # one CPU kernel everywhere: no inference repacking on AVX512-BF16 CPUs (weights.py explains)
        keep_4bit_layers_trainable(model)
    model.qadapter_name = name
    return model, tokenizer


@contextlib.contextmanager
def quantize_4bit_where_read():
    """While loading a 4-bit model: quantize each weight on the device transformers read it onto.

    transformers 4.57 reads every weight of a checkpoint straight onto the target GPU; its 4-bit bitsandbytes
    quantizer then copies it back to the CPU (`param_value.to("cpu")` in `create_quantized_param`) only for
    bitsandbytes to copy it up again and quantize it there: Llama-2-7B's 13 GB cross PCIe twice more, most of a
    4-bit load's time (benchmarks/load_4bit.py measures it). Inside this context the weight is handed to
    `bitsandbytes.nn.Params4bit` where it is; the packed weights and quantization states are byte-identical
    (tests/test_models.py; on a GPU, benchmarks/load_4bit.py). Pre-quantized checkpoints, Conv1D layers and sharded
    (device-mesh) loads keep transformers' own path. (02_loading_quantized)"""
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    original = Bnb4BitHfQuantizer.create_quantized_param

    def create_quantized_param(self, model, param_value, param_name, target_device, **kwargs):
        import bitsandbytes as bnb
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.quantizers_utils import get_module_from_name

        module, tensor_name = get_module_from_name(model, self.get_param_name(param_name))
        if self.pre_quantized or kwargs or issubclass(getattr(module, "source_cls", object), Conv1D):
            return original(self, model, param_value, param_name, target_device, **kwargs)
        settings = {k: v for k, v in getattr(module, tensor_name).__dict__.items() if k != "_is_hf_initialized"}
        module._parameters[tensor_name] = bnb.nn.Params4bit(param_value, requires_grad=False,
                                                            **settings).to(target_device)

    Bnb4BitHfQuantizer.create_quantized_param = create_quantized_param
    try:
        yield
    finally:
        Bnb4BitHfQuantizer.create_quantized_param = original


def _unreadable_weights(name: str, path, err: Exception) -> ModelLoadError:
    folder = Path(str(path))
    files = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    where = f" ({', '.join(files)} in {folder.name}/)" if files else ""
    return ModelLoadError(f"{name!r}: a weights file{where} could not be read ({type(err).__name__}: {err}). It is "
                          f"probably truncated by an interrupted download, copy or save: fetch or save it again.")


def _free_gpu_bytes(device: int) -> int:
    """Bytes a new model can still take on GPU `device`: free memory plus what PyTorch's allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _check_weights_fit(name, config, bits, quant_type, double_quant, dtype, free_bytes: int, where: str) -> None:
    """Raise ModelLoadError, before anything is downloaded or allocated, when the weights alone (as
    quant.weight_memory counts them: quantized weights, their constants, 16-bit embeddings/norms/lm_head)
    exceed `free_bytes`; from_pretrained would otherwise run out of memory halfway through loading."""
    def need(b):
        return weight_memory(config, bits=b, quant_type=quant_type, double_quant=double_quant,
                             compute_dtype=dtype)["total"]

    needed = need(bits)
    if needed <= free_bytes:
        return
    precision = {None: f"unquantized {str(dtype).removeprefix('torch.')}", 8: "8-bit",
                 4: f"4-bit {quant_type}{' + double quant' if double_quant else ''}"}[bits]
    advice = []
    if bits != 4:
        needed4 = need(4)
        advice.append(f"load it in 4-bit (bits=4: {needed4 / 2**30:.1f} GiB"
                      f"{'' if needed4 <= free_bytes else ', still too much'})")
    advice += ["a smaller model", "several GPUs with the model sharded across them (notebook 08, FSDP)",
               "if an earlier model is still loaded in this process, free it first (del model; gc.collect(); "
               "torch.cuda.empty_cache())"]
    raise ModelLoadError(f"{name!r} in {precision} needs {needed / 2**30:.1f} GiB for its weights alone, but {where} "
                         f"has {free_bytes / 2**30:.1f} GiB free (training needs more on top: "
                         f"qadapter_utils.memory.fits). Nothing was loaded. Use " + "; or ".join(advice) + ".")


def _check_quant_args(bits, quant_type) -> None:
    if bits not in (None, 4, 8):
        raise ModelLoadError(f"bits={bits!r} is not supported: bitsandbytes quantizes weights to 4 bits "
                             f"(bits=4, NF4 or FP4) or 8 bits (bits=8, LLM.int8()); use bits=None for no quantization")
    if quant_type not in ("nf4", "fp4"):
        raise ModelLoadError(f"quant_type={quant_type!r} is not supported: use 'nf4' (recommended for normally "
                             f"distributed weights) or 'fp4'")


def _as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = DTYPES
    if dtype not in names:
        raise ModelLoadError(f"compute_dtype={dtype!r} is not supported: use one of {sorted(names)} or a torch dtype")
    return names[dtype]


def _resolve(name: str, dtype) -> str:
    """A local folder with config and weights for `name`, or the hub id itself after checking it resolves."""
    if name == "tiny":
        if not (TINY_DIR / "model.safetensors").exists():
            raise ModelLoadError(f"the embedded tiny model is missing from {TINY_DIR.name}/: regenerate it with "
                                 f"`python -m qadapter_utils.tiny.build`")
        return str(TINY_DIR)
    if name.startswith("random:"):
        return str(random_checkpoint(name.split(":", 1)[1], dtype))
    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"{name!r} is a folder without config.json: point at a folder written by "
                                 f"`save_pretrained`, or use a hub id such as {LLAMA2_7B!r}")
        return str(folder)
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+|[\w.\-]+", name):
        raise ModelLoadError(f"unknown model {name!r}: it is neither 'tiny', 'random:<shape>' (shapes: "
                             f"{', '.join(sorted(SHAPES))}), an existing folder, nor a hub id like {LLAMA2_7B!r}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except OSError as err:
        raise _hub_error(name, err) from err
    return name


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    """Turn the hub's errors into one that says what to do."""
    text = f"{type(err).__name__}: {err}"
    if "gated" in text.lower() or "GatedRepoError" in text or "401" in text or "403" in text:
        return ModelLoadError(
            f"{name!r} is a gated repository and this machine is not logged in with access to it. Accept the "
            f"license on its model page, then log in (`huggingface-cli login`, or in a notebook "
            f"`from huggingface_hub import notebook_login; notebook_login()`), or use an ungated copy of the same "
            f"weights such as {LLAMA2_7B_UNGATED!r}. To run without any download use 'tiny'.")
    if ("offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower()
            or "ConnectionError" in text or "LocalEntryNotFoundError" in text):
        return ModelLoadError(
            f"could not download {name!r}: no network (or HF_HUB_OFFLINE is set) and it is not in the local cache. "
            f"Connect and retry, pass a local folder with the weights, or use 'tiny' (embedded, no network) or "
            f"'random:llama2-7b' (real shape, random weights).")
    if "not a valid model identifier" in text or "RepositoryNotFoundError" in text or "404" in text:
        return ModelLoadError(
            f"unknown model {name!r}: no such repository on the hub and no such local folder. Check the spelling "
            f"(e.g. {LLAMA2_7B!r}), or use 'tiny' or 'random:<shape>' with a shape from {sorted(SHAPES)}.")
    return ModelLoadError(f"could not load {name!r} ({text}). Use 'tiny' to run without any download.")


def random_checkpoint(shape: str, dtype) -> Path:
    """Save a randomly initialised model of `shape` once (cached under $QADAPTER_CACHE or the temp folder) so
    that `from_pretrained` can quantize it exactly as it would real weights. Values change neither memory nor
    speed, so random weights serve for memory and speed work at real scale."""
    if shape not in SHAPES:
        raise ModelLoadError(f"unknown shape {shape!r} in 'random:{shape}': choose one of {sorted(SHAPES)}")
    cache = Path(os.environ.get("QADAPTER_CACHE", Path(tempfile.gettempdir()) / "qadapter"))
    shape_key = hashlib.sha1(json.dumps(SHAPES[shape], sort_keys=True).encode()).hexdigest()[:8]  # shape edits
    folder = cache / f"random-{shape}-{str(dtype).replace('torch.', '')}-{shape_key}"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM

    config = model_config(shape)
    torch.manual_seed(0)
    target = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    with torch.device(target):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")  # several processes may build it at once
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder
