"""Misuse of the public API ends in a clear, early error, and leaves the model and saved work as they were.

CASES is a table a reader can extend: one row per misuse, (id, call, expected exception type, a fragment of its
message). `call` receives a `Ctx` with a fresh tiny 4-bit model (`ctx.model`, `ctx.tok`) and a temporary folder
(`ctx.tmp`). After every refused call the test checks that the base model's tensors are bit-identical and that no
adapter was left registered. Tests below the table cover what a single call cannot: no overwrite, integrity of
loaded files, torn checkpoints.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from qadapter_utils import memory, quant
from qadapter_utils.data import world_qa
from qadapter_utils.guards import IntegrityError, SavedWorkError, UsageError
from qadapter_utils.methods import AdapterMethodError, add_adapter, load_adapter, save_adapter
from qadapter_utils.models import ModelLoadError, load_model
from qadapter_utils.train import evaluate, make_trainer, save_trained_adapter

TRAIN, _ = world_qa(as_dataset=False)
ROWS = TRAIN[:16]


class Ctx:
    def __init__(self, tmp: Path):
        self.model, self.tok = load_model("tiny", bits=4)
        self.tmp = tmp

    def trainer(self, **kw):
        add_adapter(self.model, "lora")
        return make_trainer(self.model, self.tok, kw.pop("rows", ROWS), output_dir=self.tmp / "run", **kw)

    def saved_adapter(self, name="lora") -> Path:
        model, _ = load_model("tiny", bits=4)
        add_adapter(model, "lora", name=name)
        return save_adapter(model, name, self.tmp / f"saved-{name}")


CASES = [
    # adapter names that are a component of a module path would make adapters treat base weights as the adapter's
    ("name=weight", lambda c: add_adapter(c.model, "seq_bn", name="weight"), AdapterMethodError, "module or weight"),
    ("name=bias", lambda c: add_adapter(c.model, "lora", name="bias"), AdapterMethodError, "module or weight"),
    ("name=q_proj", lambda c: add_adapter(c.model, "lora", name="q_proj"), AdapterMethodError, "q_proj"),
    ("name=lora_A", lambda c: add_adapter(c.model, "lora", name="lora_A"), AdapterMethodError, "module or weight"),
    ("name=layers", lambda c: add_adapter(c.model, "lora", name="layers"), AdapterMethodError, "module or weight"),
    ("name with dot", lambda c: add_adapter(c.model, "lora", name="a.b"), AdapterMethodError, "no dots"),
    ("load name=weight", lambda c: load_adapter(c.model, c.saved_adapter(), name="weight"), AdapterMethodError,
     "module or weight"),
    # sizes adapters would fail on deep inside, or accept and then train nothing
    ("r=0", lambda c: add_adapter(c.model, "lora", r=0), AdapterMethodError, "r must be an integer >= 1"),
    ("r=-1", lambda c: add_adapter(c.model, "lora", r=-1), AdapterMethodError, "r must be an integer >= 1"),
    ("r=2.5", lambda c: add_adapter(c.model, "lora", r=2.5), AdapterMethodError, "r must be an integer"),
    ("alpha='x'", lambda c: add_adapter(c.model, "lora", alpha="x"), AdapterMethodError, "alpha must be a number"),
    ("alpha=0", lambda c: add_adapter(c.model, "lora", alpha=0), AdapterMethodError, "would train nothing"),
    ("dropout=2", lambda c: add_adapter(c.model, "lora", dropout=2), AdapterMethodError, "dropout must be"),
    ("reduction_factor=0", lambda c: add_adapter(c.model, "seq_bn", reduction_factor=0), AdapterMethodError,
     "reduction_factor must be a number > 0"),
    ("prefix_length=0", lambda c: add_adapter(c.model, "prefix", prefix_length=0), AdapterMethodError,
     "prefix_length must be an integer >= 1"),
    ("unipelt r=0", lambda c: add_adapter(c.model, "unipelt", r=0), AdapterMethodError, "r must be"),
    # the training budget and the data are never changed silently
    ("max_length=24 cuts answers", lambda c: c.trainer(rows=TRAIN[:64], max_length=24), UsageError,
     "or more (the longest row)"),
    ("max_length=-3", lambda c: c.trainer(max_length=-3), UsageError, "max_length must be an integer >= 1"),
    ("max_length=0", lambda c: c.trainer(max_length=0), UsageError, "max_length must be an integer >= 1"),
    ("max_steps=0", lambda c: c.trainer(max_steps=0), UsageError, "max_steps must be an integer >= 1"),
    ("learning_rate=inf", lambda c: c.trainer(learning_rate=math.inf), UsageError, "learning_rate must be"),
    ("learning_rate=nan", lambda c: c.trainer(learning_rate=math.nan), UsageError, "learning_rate must be"),
    ("learning_rate=0", lambda c: c.trainer(learning_rate=0), UsageError, "learning_rate must be a number > 0"),
    ("learning_rate=-1e-3", lambda c: c.trainer(learning_rate=-1e-3), UsageError, "learning_rate must be"),
    ("batch size 0", lambda c: c.trainer(per_device_train_batch_size=0), UsageError, "per_device_train_batch_size"),
    # quantization and the planner
    ("quantize_4bit NaN + double quant", lambda c: quant.quantize_4bit(torch.tensor([1.0, math.nan] * 64),
                                                                       double_quant=True), ValueError, "non-finite"),
    ("quantize_4bit inf", lambda c: quant.quantize_4bit(torch.tensor([1.0, math.inf] * 64)), ValueError,
     "non-finite"),
    ("evaluate max_batch_tokens=0", lambda c: evaluate(c.model, c.tok, ROWS[:2], max_batch_tokens=0), UsageError,
     "max_batch_tokens=0"),
    ("evaluate batch_size=2.5", lambda c: evaluate(c.model, c.tok, ROWS[:2], batch_size=2.5), UsageError,
     "batch_size=2.5"),
    ("quantize_4bit kernel='gpu'", lambda c: quant.quantize_4bit(torch.zeros(64), kernel="gpu"), ValueError,
     "kernel='gpu'"),
    ("estimate autocast='yes'", lambda c: memory.estimate_training_memory("llama2-7b", autocast="yes"), ValueError,
     "autocast='yes'"),
    ("estimate recipe='fast'", lambda c: memory.estimate_training_memory("llama2-7b", recipe="fast"), ValueError,
     "recipe='fast'"),
    ("estimate packed attention with prefix tuning",
     lambda c: memory.estimate_training_memory("llama2-7b", adapter="prefix", packed_attention=True), ValueError,
     "prefix tuning"),
    ("max_batch_size limit=0", lambda c: memory.max_batch_size("T4", limit=0), ValueError, "limit=0"),
    ("max_seq_len limit=100", lambda c: memory.max_seq_len("T4", limit=100), ValueError, "limit=100"),
    ("safety_margin=-1", lambda c: memory.fits("llama2-7b", "T4", safety_margin=-1), ValueError, "[0, 1)"),
    ("safety_margin=1", lambda c: memory.max_batch_size("T4", safety_margin=1), ValueError, "[0, 1)"),
    # loading what is not there
    ("load from an empty folder", lambda c: load_adapter(c.model, c.tmp), AdapterMethodError, "adapter_config.json"),
    ("load_model truncated safetensors", lambda c: load_model(str(_truncated_model_copy(c.tmp)), bits=4),
     ModelLoadError, "model.safetensors"),
]


def _truncated_model_copy(tmp: Path) -> Path:
    from qadapter_utils.models import TINY_DIR

    folder = tmp / "broken-model"
    folder.mkdir()
    for file in TINY_DIR.iterdir():
        if file.is_file():
            data = file.read_bytes()
            (folder / file.name).write_bytes(data[: len(data) // 2] if file.name == "model.safetensors" else data)
    return folder


def _snapshot(model) -> dict:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("call,error,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_misuse_is_refused_early_and_changes_nothing(tmp_path, call, error, fragment):
    ctx = Ctx(tmp_path)
    before = _snapshot(ctx.model)
    adapters_before = set(getattr(getattr(ctx.model, "adapters_config", None), "adapters", {}) or {})
    with pytest.raises(error) as caught:
        call(ctx)
    assert fragment in str(caught.value)
    after = _snapshot(ctx.model)
    base = {n for n in before if n in after}
    assert all(torch.equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in base)
    adapters_after = set(getattr(getattr(ctx.model, "adapters_config", None), "adapters", {}) or {})
    assert adapters_after <= adapters_before | {"lora"}  # only the trainer cases' own adapter


def test_a_refused_name_leaves_the_4bit_base_intact_and_a_good_name_still_works():
    model, _ = load_model("tiny", bits=4)
    q = model.model.layers[0].self_attn.q_proj
    with pytest.raises(AdapterMethodError):
        add_adapter(model, "seq_bn", name="weight")
    assert q.weight.dtype == torch.uint8
    assert add_adapter(model, "seq_bn", name="task") == "task"
    assert q.weight.dtype == torch.uint8 and not q.weight.requires_grad


def test_a_failure_inside_adapters_leaves_no_half_added_adapter(monkeypatch):
    from qadapter_utils import methods

    model, _ = load_model("tiny", bits=4)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure inside adapters")

    monkeypatch.setattr(methods, "_place", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        add_adapter(model, "lora")
    assert "lora" not in model.adapters_config
    monkeypatch.undo()
    assert add_adapter(model, "lora") == "lora"  # a retry under the same name works


# --------------------------------------------------------------------------------------------------------------
# no silent overwrite


def test_save_adapter_never_replaces_another_adapter(tmp_path):
    model, _ = load_model("tiny", bits=4)
    add_adapter(model, "lora", name="first")
    add_adapter(model, "seq_bn", name="second")
    folder = save_adapter(model, "first", tmp_path / "a")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SavedWorkError, match="overwrite=True"):
        save_adapter(model, "second", folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    save_adapter(model, "second", folder, overwrite=True)
    assert json.loads((folder / "adapter_config.json").read_text())["name"] == "second"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_overwrite_never_deletes_files_that_are_not_saved_work(tmp_path):
    model, _ = load_model("tiny", bits=4)
    add_adapter(model, "lora")
    folder = save_adapter(model, "lora", tmp_path / "a")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SavedWorkError, match="notes.txt"):
        save_adapter(model, "lora", folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "adapter.safetensors").exists()


@pytest.mark.parametrize("marker", ["pytorch_model.bin", "tokenizer.json", "model.safetensors", "adapter_config.json"])
def test_saved_work_is_recognised(tmp_path, marker):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / marker).write_text("{}")
    ctx = Ctx(tmp_path)
    add_adapter(ctx.model, "lora")
    for kw in ({}, {"overwrite_output_dir": True}, {"resume": True}):
        with pytest.raises(SavedWorkError, match=marker):
            make_trainer(ctx.model, ctx.tok, ROWS, output_dir=tmp_path / "run", **kw)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [marker]
    with pytest.raises(SavedWorkError, match="overwrite=True"):
        save_trained_adapter(ctx.model, "lora", tmp_path / "run")


def test_load_adapter_over_an_existing_name_needs_overwrite(tmp_path):
    model, _ = load_model("tiny", bits=4)
    add_adapter(model, "lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "loras" in n}
    other = Ctx(tmp_path).saved_adapter("lora")
    with pytest.raises(AdapterMethodError, match="overwrite=True"):
        load_adapter(model, other)
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters() if "loras" in n)
    assert load_adapter(model, other, name="lora_b") == "lora_b"  # beside it
    load_adapter(model, other, overwrite=True)
    assert not all(torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


def _train(folder, lr=1e-2, **kw):
    torch.manual_seed(0)
    model, tok = load_model("tiny", bits=4)
    add_adapter(model, "lora")
    trainer = make_trainer(model, tok, TRAIN[:32], output_dir=folder, max_steps=2, save_steps=1,
                           per_device_train_batch_size=4, learning_rate=lr, disable_tqdm=True, **kw)
    return trainer


def test_another_runs_checkpoints_are_never_overwritten_or_continued(tmp_path):
    _train(tmp_path / "a").train()
    saved = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    for kw in ({"overwrite_output_dir": True}, {"resume": True}):
        with pytest.raises(SavedWorkError, match="another run's checkpoints.*learning_rate"):
            _train(tmp_path / "a", lr=5e-3, **kw)
    # the same run may be resumed; a different run may not resume from its checkpoint, even by path
    _train(tmp_path / "a", resume=True)
    other = _train(tmp_path / "b", lr=5e-3)
    with pytest.raises(SavedWorkError, match="belongs to another run"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()} == saved


def test_a_torn_checkpoint_is_named_when_resuming(tmp_path):
    _train(tmp_path / "a").train()
    (tmp_path / "a" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_hi')  # killed
    with pytest.raises(IntegrityError, match=r"checkpoint a/checkpoint-2 is torn.*checkpoint-1"):
        _train(tmp_path / "a", resume=True).train(resume_from_checkpoint=True)


# --------------------------------------------------------------------------------------------------------------
# integrity of loaded adapters


def _saved(tmp_path, method="lora", **overrides) -> Path:
    model, _ = load_model("tiny", bits=4)
    name = add_adapter(model, method, name="task", **overrides)
    return save_adapter(model, name, tmp_path / method)


def _edit_config(folder: Path, **changes) -> None:
    file = folder / "adapter_config.json"
    saved = json.loads(file.read_text())
    saved["config"].update(changes)
    file.write_text(json.dumps(saved))


@pytest.mark.parametrize("damage,fragment", [
    (lambda f: _edit_config(f, architecture="prefix_tuning"), "does not match the saved weights"),
    (lambda f: _edit_config(f, attn_matrices=["q", "k", "v"]), "not in the file"),
    (lambda f: _edit_config(f, r=0), "r must be an integer >= 1"),
    (lambda f: (f / "adapter_config.json").write_text("{"), "not a readable adapter config"),
    (lambda f: (f / "adapter.safetensors").write_bytes((f / "adapter.safetensors").read_bytes()[:1000]),
     "adapter.safetensors cannot be read"),
    (lambda f: (f / "adapter.safetensors").unlink(), "holds no adapter weights"),
], ids=["other architecture", "other target matrices", "bad size", "broken json", "truncated", "missing"])
def test_load_adapter_checks_config_against_tensors(tmp_path, damage, fragment):
    folder = _saved(tmp_path)
    damage(folder)
    model, _ = load_model("tiny", bits=4)
    before = _snapshot(model)
    with pytest.raises((IntegrityError, AdapterMethodError), match=fragment):
        load_adapter(model, folder)
    assert "task" not in getattr(model, "adapters_config", ())
    after = _snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before if n in after)


def test_non_finite_adapter_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path)
    tensors = load_file(str(folder / "adapter.safetensors"))
    key = next(iter(tensors))
    tensors[key][0] = math.nan
    save_file(tensors, str(folder / "adapter.safetensors"))
    with pytest.raises(IntegrityError, match="non-finite"):
        load_adapter(load_model("tiny", bits=4)[0], folder)


def test_training_after_evaluation_still_reaches_every_adapter_tensor():
    """bitsandbytes 0.50.2 repacks a 4-bit layer for inference at an eval forward on AVX512-BF16 CPUs and then
    passes no gradient through it; make_trainer keeps the layers trainable, so this holds on every CPU."""
    from qadapter_utils.train import evaluate

    model, tok = load_model("tiny", bits=4)
    add_adapter(model, "lora")
    evaluate(model, tok, ROWS[:4])  # an eval-mode forward, as an evaluation during training does
    trainer = make_trainer(model, tok, ROWS, max_steps=1, per_device_train_batch_size=4, save_strategy="no",
                           disable_tqdm=True)
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None and bool(p.grad.any()) for n, p in model.named_parameters() if "lora_B" in n)
