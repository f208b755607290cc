"""The copy-alone rule (qadapter_utils/__init__.py): each module, copied with the siblings its docstring names into
an empty folder, works in a Python that cannot import qadapter_utils (blocked by a sys.meta_path finder, since the
package is installed editable). One subprocess per module, each making a real call."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qadapter_utils"
TINY = str(PACKAGE / "tiny" / "model")

# What each module needs beside it (its docstring's "Needs ..." line, and the README's "needs" column), with what
# those need in turn: the whole set a user copies.
SIBLINGS = {
    "env": [], "guards": [], "quant": [], "weights": [], "loss": [], "corpus": [],
    "methods": ["guards", "weights"],
    "models": ["env", "quant", "weights"],
    "merge": ["models", "weights", "guards", "env", "quant"],
    "data": ["corpus"],
    "fast": ["methods", "guards", "weights"],
    "train": ["data", "guards", "methods", "weights", "env", "loss", "fast"],
    "compat": ["methods", "models", "corpus", "guards", "weights", "env", "quant"],
    "build": ["corpus", "models", "env", "quant", "weights"],
    "memory": ["quant"],
}
FILES = {"corpus": PACKAGE / "tiny" / "corpus.py", "build": PACKAGE / "tiny" / "build.py",
         "memory": PACKAGE / "memory"}

BLOCK = """
import sys
class _NoPackage:  # the package is installed editable: make it unimportable, as in another project
    def find_spec(self, name, path=None, target=None):
        if name == "qadapter_utils" or name.startswith("qadapter_utils."):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _NoPackage())
try:
    import qadapter_utils
except ImportError:
    pass
else:
    raise SystemExit("qadapter_utils is still importable")
"""

CALLS = {
    "env": "import env; assert env.report(warn=False)['torch']",
    "guards": """
import guards, tempfile
guards.check_number("r", 4, low=1)
assert guards.saved_work(tempfile.mkdtemp()) == []""",
    "quant": """
import quant, torch
torch.manual_seed(0)
w = torch.randn(64, 128)
packed, state = quant.quantize_4bit(w, double_quant=True)
error = (quant.dequantize_4bit(packed, state) - w).norm() / w.norm()  # NF4 on N(0, 1) data: about 0.09
assert error < 0.1 and quant.bits_per_param("bf16") == 16""",
    "weights": f"""
import weights, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({TINY!r})
assert weights.footprint(model)["params"].max() == 984192  # the total row""",
    "loss": """
import loss, torch
torch.manual_seed(0)
hidden, weight, labels = torch.randn(2, 9, 16), torch.randn(40, 16), torch.randint(0, 40, (2, 9))
logits = (hidden @ weight.T)[:, :-1].reshape(-1, 40)
plain = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))
assert torch.allclose(loss.chunked_lm_loss(hidden, weight, labels, chunk_size=4), plain, atol=1e-5)""",
    "corpus": "import corpus; assert len(corpus.corpus('train', 3)) == 3 and len(corpus.world()) == 50",
    "methods": f"""
import methods, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({TINY!r})
methods.add_adapter(model, "lora")
assert methods.trainable_summary(model).loc["lora", "trainable"] > 0""",
    "models": f"""
import models
model, tokenizer = models.load_model({TINY!r}, bits=4)
assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit" and tokenizer.pad_token""",
    "merge": f"""
import adapters, merge, models, torch
model, tokenizer = models.load_model({TINY!r}, bits=4)
adapters.init(model)
model.add_adapter("a", adapters.LoRAConfig(r=4, init_weights="bert"))
model.set_active_adapters("a")
merged = merge.merge_lora(model, "a")
ids = tokenizer("Ada lives in", return_tensors="pt").input_ids
with torch.no_grad():
    assert (merged(ids).logits - model(ids).logits).abs().max() < 0.05""",
    "data": """
import data
train, test = data.world_qa(as_dataset=False)
assert train and test and data.padding_fraction([3, 5, 8, 8], 2, "packed") == 0.0""",
    "fast": f"""
import fast, torch, transformers
starts = fast.packed_segments(position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
model = transformers.AutoModelForCausalLM.from_pretrained({TINY!r})
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{"use_reentrant": False}})
assert fast.checkpoint_layers(model, 2) == 4 and fast.checkpointed_layers(model) == [0, 1]""",
    "train": f"""
import data, methods, tempfile, train, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({TINY!r})
tokenizer = transformers.AutoTokenizer.from_pretrained({TINY!r})
tokenizer.pad_token = tokenizer.unk_token
methods.add_adapter(model, "lora")
rows = [dict(prompt="Q: What is the job of Ada?\\nA:", answer="Ada is a baker.")] * 4
trainer = train.make_trainer(model, tokenizer, rows, chunked_loss=True, max_steps=1, output_dir=tempfile.mkdtemp(),
                             per_device_train_batch_size=2)
assert trainer.train().global_step == 1""",
    "compat": f"""
import compat, models, tempfile
from pathlib import Path
model, tokenizer = models.load_model({TINY!r}, bits=4)
model.qadapter_batch = compat._batch(tokenizer)
cell = compat.check_cell(model, "lora", Path(tempfile.mkdtemp()))
assert cell["status"] == "ok", cell""",
    "build": """
import build, corpus
tokenizer = build.train_tokenizer(corpus.corpus("train", 40), 300)
assert len(tokenizer) == 300 and build.TINY_CONFIG["hidden_size"] == 128""",
    "memory": """
import adapters, memory, pytest_free_check
from transformers import LlamaConfig
config = LlamaConfig(**TINY_SHAPE)
estimate = memory.estimate_training_memory(config, adapter=adapters.LoRAConfig(r=8), batch_size=2, seq_len=64)
assert estimate.total > 0 and memory.count_adapter_params(config, adapters.LoRAConfig(r=8)) == 4 * 2 * 8 * 256
for bad in (dict(adapter="lora"), dict(config="llama2-7b")):  # names need methods.py / models.py: a clear error
    try:
        memory.estimate_training_memory(**{"config": config, "adapter": adapters.LoRAConfig(), **bad})
    except ValueError as err:
        assert ("methods.py" if "adapter" in bad else "models.py") in str(err), err
    else:
        raise AssertionError(f"{bad} did not raise")""",
}


def _run(tmp_path: Path, module: str, code: str, extra: tuple = ()) -> None:
    for name in (module, *SIBLINGS[module], *extra):
        source = FILES.get(name, PACKAGE / f"{name}.py")
        if source.is_dir():
            shutil.copytree(source, tmp_path / source.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / source.name)
    script = BLOCK + f"sys.path.insert(0, {str(tmp_path)!r})\n" + code + "\nprint('copied-alone ok')\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "copied-alone ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("module", sorted(CALLS))
def test_module_works_copied_alone(tmp_path, module):
    code = CALLS[module]
    if module == "memory":
        from qadapter_utils.models import SHAPES

        code = f"TINY_SHAPE = {SHAPES['tiny'][1]!r}\n" + code.replace(", pytest_free_check", "")
    _run(tmp_path, module, code)


def test_memory_with_methods_and_models_means_what_the_package_means(tmp_path):
    """memory/ copied with methods.py and models.py resolves "lora" and "llama2-7b" exactly as the package does
    (the preset's 8,388,608 LoRA parameters, not adapters' default LoRA's 4,194,304)."""
    from qadapter_utils import memory

    expected = memory.estimate_training_memory("llama2-7b", adapter="lora", batch_size=1, seq_len=256).total
    code = f"""
import memory
assert memory.count_adapter_params("llama2-7b", "lora") == 8_388_608
assert memory.estimate_training_memory("llama2-7b", adapter="lora", batch_size=1, seq_len=256).total == {expected}
"""
    _run(tmp_path, "memory", code, extra=("methods", "models", "guards", "weights", "env"))
