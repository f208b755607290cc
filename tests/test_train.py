"""qadapter_utils.train: defaults per device, clear errors, resuming after an interruption gives the same adapter
as an uninterrupted run, no saved work is overwritten, and the teacher-forced accuracy is greedy decoding."""
import contextlib
import json
import math

import pytest
import torch
from transformers import TrainerCallback

from qadapter_utils.data import world_qa
from qadapter_utils.methods import add_adapter
from qadapter_utils.models import load_model
from qadapter_utils.train import (
    checkpoints,
    default_arguments,
    evaluate,
    fast_defaults,
    generate_answers,
    history,
    make_trainer,
    save_trained_adapter,
    step_stats,
)

TRAIN, EVAL = world_qa(as_dataset=False)


class StopAfterStep(TrainerCallback):
    """Stop training after optimizer step `step`, saving a checkpoint there: simulates an interruption (a Colab
    disconnect, a pre-empted job) for the resume tests."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def test_default_arguments_per_device():
    cpu = default_arguments(device="cpu")
    assert cpu["optim"] == "adamw_torch" and not cpu["bf16"] and not cpu["fp16"]
    assert not cpu["gradient_checkpointing"] and cpu["save_total_limit"] is None
    bf16 = default_arguments(device="cuda", compute_dtype=torch.bfloat16)
    assert bf16["optim"] == "paged_adamw_8bit" and bf16["bf16"] and not bf16["fp16"]
    assert bf16["gradient_checkpointing"] and bf16["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    t4 = default_arguments(device="cuda", compute_dtype=torch.float16)  # Colab's T4 has no bf16
    assert t4["fp16"] and not t4["bf16"]
    assert all("evaluation_strategy" not in args for args in (cpu, bf16, t4))  # renamed eval_strategy


def test_fast_recipe_defaults_per_device():
    """On CUDA the chunked loss and packed attention are on (packed attention only where it applies: packing on,
    no prefix tuning); on the CPU both off, so make_trainer on the CPU trains as before."""
    model, tok = load_model("tiny")
    add_adapter(model, "lora")
    assert fast_defaults(model) == {"chunked_loss": False, "packed_attention": False}  # the tiny model is on the CPU
    assert fast_defaults(model, device="cuda") == {"chunked_loss": True, "packed_attention": True}
    assert fast_defaults(model, packing=False, device="cuda") == {"chunked_loss": True, "packed_attention": False}
    add_adapter(model, "prefix")
    assert fast_defaults(model, device="cuda") == {"chunked_loss": True, "packed_attention": False}
    trainer = make_trainer(model, tok, TRAIN[:4], save_strategy="no")
    assert trainer.compute_loss.__name__ == "compute_loss"  # the Trainer's own loss: not chunked on the CPU
    assert model.config._attn_implementation == "eager"  # prefix tuning kept its attention


def test_mixed_precision_training_runs_without_the_cast_hooks_and_puts_them_back(tmp_path):
    """Trainer(bf16=True) trains under autocast: make_trainer suspends the adapters' edge casts for train() (a
    round trip there: tests/test_methods.py) and puts them back afterwards, also when training fails."""
    model, tok = load_model("tiny", compute_dtype=torch.bfloat16)
    add_adapter(model, "ia3")  # scales the keys: with packed attention their dtype must stay the query's

    def hooked():  # modules whose inputs are cast
        return sum(bool(getattr(m, "_qadapter_cast_hooks", ())) and getattr(m, "_qadapter_casts_inputs", True)
                   for m in model.modules())

    before, seen = hooked(), []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(hooked())

    for fast in (False, True):  # the Trainer's own loss, and the fast recipe (the chunked loss must run under the
        # autocast accelerate puts around model.forward: it is computed inside the forward, lm_head swapped)
        seen.clear()
        trainer = make_trainer(model, tok, TRAIN[:8], output_dir=tmp_path / f"run-{fast}", max_steps=2, bf16=True,
                               per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
                               callbacks=[Count()], chunked_loss=fast, packed_attention=fast, logging_steps=1)
        # as on a CUDA GPU: there the Trainer puts no autocast of its own around compute_loss (it does on the CPU,
        # use_cpu_amp) and leaves it to accelerate's wrapper of model.forward
        trainer.autocast_smart_context_manager = lambda *args, **kwargs: contextlib.nullcontext()
        trainer.train()
        assert before > 0 and seen == [0, 0] and hooked() == before
        assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)

    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    trainer = make_trainer(model, tok, TRAIN[:8], output_dir=tmp_path / "failed", max_steps=2, bf16=True,
                           save_strategy="no", disable_tqdm=True, callbacks=[Fail()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert hooked() == before
    # a full-precision trainer after a bf16 one trains in full precision (accelerate keeps one state per process)
    fp32, tok = load_model("tiny")
    add_adapter(fp32, "lora")
    trainer = make_trainer(fp32, tok, TRAIN[:8], output_dir=tmp_path / "fp32", max_steps=1, save_strategy="no")
    assert trainer.accelerator.mixed_precision == "no"


def test_untrained_model_cannot_answer_and_errors_are_clear():
    model, tok = load_model("tiny", bits=4)
    before = evaluate(model, tok, EVAL)
    assert before["accuracy"] == 0.0 and before["examples"] == len(EVAL)
    with pytest.raises(ValueError, match="no active adapter"):
        make_trainer(model, tok, TRAIN[:8])
    add_adapter(model, "lora")
    with pytest.raises(ValueError, match="eval_strategy"):
        make_trainer(model, tok, TRAIN[:8], evaluation_strategy="steps")


def test_teacher_forced_accuracy_is_greedy_decoding():
    model, tok = load_model("tiny", bits=4)
    prompt = "Ada lives in"
    ids = tok(prompt).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    greedy = out[0, len(ids):].tolist()
    row = {"input_ids": ids + greedy, "labels": [-100] * len(ids) + greedy}
    right = evaluate(model, tok, [row])
    assert right["accuracy"] == 1.0 and right["token accuracy"] == 1.0
    wrong = evaluate(model, tok, [{**row, "labels": row["labels"][:-1] + [(greedy[-1] + 1) % 512]}])
    assert wrong["accuracy"] == 0.0  # one wrong token fails the whole answer, but only that token's share
    assert wrong["token accuracy"] == pytest.approx((len(greedy) - 1) / len(greedy))
    assert generate_answers(model, tok, [prompt], max_new_tokens=4) == [tok.decode(greedy).strip()]


def test_evaluation_bounds_the_tokens_per_forward_pass_without_changing_the_scores():
    model, tok = load_model("tiny", bits=4)
    add_adapter(model, "lora")
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)  # a non-zero adapter, so the scores are not the base model's
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    whole = evaluate(model, tok, EVAL[:40], batch_size=32)
    assert len(calls) == 2 and max(calls) > 64
    calls.clear()
    bounded = evaluate(model, tok, EVAL[:40], batch_size=32, max_batch_tokens=64)
    hook.remove()
    assert len(calls) > 2 and max(calls) <= 64  # every embedded example is shorter than 64 tokens
    assert bounded["examples"] == whole["examples"] == 40
    assert bounded["accuracy"] == whole["accuracy"] and bounded["token accuracy"] == whole["token accuracy"]
    assert bounded["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)


def _run(folder, stop=None, resume=False):
    torch.manual_seed(0)
    model, tok = load_model("tiny", bits=4)
    add_adapter(model, "lora")
    trainer = make_trainer(model, tok, TRAIN[:64], output_dir=folder, resume=resume, max_steps=6, save_steps=3,
                           per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, disable_tqdm=True,
                           callbacks=[StopAfterStep(stop)] if stop else [])
    trainer.train(resume_from_checkpoint=True if resume else None)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "loras" in n}
    return model, trainer, weights


def test_resume_after_interruption_gives_the_same_adapter(tmp_path):
    _, straight, expected = _run(tmp_path / "straight")
    stats = step_stats(straight)
    assert straight.state.global_step == 6 and stats["steps"] == 6
    assert stats["peak MiB"] > 0 and "activations saved for backward" in stats["memory measure"]
    assert history(straight)["loss"].notna().sum() == 6
    _, interrupted, halfway = _run(tmp_path / "resumed", stop=3)
    assert interrupted.state.global_step == 3
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["checkpoint-3"]
    saved = sorted(p.name for p in (tmp_path / "resumed" / "checkpoint-3" / "lora").iterdir())
    assert saved == ["adapter_config.json", "pytorch_adapter.bin"]  # no copy of the frozen lm_head
    assert any(not torch.equal(halfway[n], expected[n]) for n in expected)  # the comparison can fail
    # the folder now holds a checkpoint: a new trainer refuses it unless told to resume
    model, tok = load_model("tiny", bits=4)
    add_adapter(model, "lora")
    with pytest.raises(FileExistsError, match="resume=True"):
        make_trainer(model, tok, TRAIN[:64], output_dir=tmp_path / "resumed")
    _, resumed, final = _run(tmp_path / "resumed", resume=True)
    assert resumed.state.global_step == 6
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["checkpoint-3", "checkpoint-6"]  # none deleted
    for name in expected:  # bitwise: same data order, optimizer/scheduler/RNG state restored, same kernels
        assert torch.equal(final[name], expected[name]), name


def test_save_trained_adapter_never_overwrites(tmp_path):
    model, tok = load_model("tiny", bits=4)
    name = add_adapter(model, "lora")
    folder = save_trained_adapter(model, name, tmp_path / "adapter")
    # the adapter alone: no copy of the frozen lm_head (adapters' own save_adapter adds model_head.safetensors)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_trained_adapter(model, name, folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    save_trained_adapter(model, name, folder, overwrite=True)


def test_generate_answers_is_greedy_decoding_with_an_adapter():
    # generate_answers decodes without the KV cache by default (right for any model, even one that went through a
    # bare adapters.init, whose Llama layers drop transformers 4.57's cache: adapter-hub/adapters#824; add_adapter's
    # hook hands the cache over); it must equal greedy decoding by full forward passes
    torch.manual_seed(0)
    model, tok = load_model("tiny", bits=4)
    add_adapter(model, "lora")
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    model.eval()
    prompt = EVAL[0]["prompt"]
    ids = tok(prompt).input_ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax().item()
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
    expected = tok.decode(ids[len(tok(prompt).input_ids):]).strip()
    assert generate_answers(model, tok, [prompt], max_new_tokens=6) == [expected]


def test_chunked_loss_trains_like_the_plain_loss(tmp_path):
    """make_trainer(chunked_loss=True): same losses and adapter as the plain loss (chunks of 16 tokens force
    several chunks per batch), and evaluation still works."""
    results = []
    for chunked in (False, True):
        torch.manual_seed(0)
        model, tok = load_model("tiny", bits=4)
        add_adapter(model, "lora")
        trainer = make_trainer(model, tok, TRAIN[:32], TRAIN[32:40], output_dir=tmp_path / str(chunked),
                               max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                               save_strategy="no", disable_tqdm=True, chunked_loss=chunked, chunk_size=16)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        weights = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if "loras" in n])
        results.append((losses, weights, trainer.evaluate()["eval_loss"]))
    (plain, w_plain, e_plain), (chunk, w_chunk, e_chunk) = results
    assert torch.allclose(torch.tensor(plain), torch.tensor(chunk), rtol=1e-4)
    # Adam divides by sqrt(v): entries with tiny gradients turn fp32 summation-order differences into up to ~lr
    # per step; measured 6e-5 after 3 steps of lr 1e-2, so 2e-4 (2 % of one step). Gradients themselves are
    # compared tightly in tests/test_loss.py.
    assert torch.allclose(w_plain, w_chunk, atol=2e-4)
    assert abs(e_plain - e_chunk) < 1e-4 * abs(e_plain)


def test_tokens_per_step_batches_whole_rows_up_to_the_budget(tmp_path):
    from qadapter_utils.data import token_batches
    from qadapter_utils.guards import UsageError

    model, tok = load_model("tiny", bits=4)
    add_adapter(model, "lora")
    rows = TRAIN[:40]
    trainer = make_trainer(model, tok, rows, tokens_per_step=160, max_steps=2, output_dir=tmp_path / "run",
                           save_strategy="no", disable_tqdm=True)
    lengths = [len(r["input_ids"]) for r in trainer.train_dataset]
    batches = list(trainer.get_train_dataloader())
    assert sum(int(b["input_ids"].numel()) for b in batches) == sum(lengths)  # every row once, no padding
    assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= 160 for b in batches)
    assert len(batches) == len(token_batches(lengths, 160)) < len(rows)
    trainer.train()
    assert step_stats(trainer)["steps"] == 2
    with pytest.raises(UsageError, match="longest training row"):
        make_trainer(model, tok, rows, tokens_per_step=max(lengths) - 1, output_dir=tmp_path / "a")
    with pytest.raises(UsageError, match="needs packing=True"):
        make_trainer(model, tok, rows, tokens_per_step=160, packing=False, output_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="does not fit"):
        token_batches([5, 9], 8)


def test_processes_claiming_one_output_dir_at_once_all_succeed(tmp_path, monkeypatch):
    # data parallelism: every process runs make_trainer on the same output_dir at the same moment. Two threads
    # meet between writing the run file and renaming it into place, the order in which a shared temporary name
    # failed one of two DDP processes (FileNotFoundError) in 2 of 6 runs of scripts/train_distributed.py here
    import os
    import threading

    from qadapter_utils import train as train_module

    meet, real_replace, errors = threading.Barrier(2, timeout=30), os.replace, []

    def replace_after_both_wrote(src, dst):
        meet.wait()
        real_replace(src, dst)

    monkeypatch.setattr(train_module.os, "replace", replace_after_both_wrote)

    def claim():
        try:
            train_module._claim_output_dir(tmp_path / "run", {"run": 1}, resume=False, overwrite=False)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert json.loads((tmp_path / "run" / train_module.RUN_FILE).read_text()) == {"identity": {"run": 1}}
    assert [p.name for p in (tmp_path / "run").iterdir()] == [train_module.RUN_FILE], "no temporary file left"
