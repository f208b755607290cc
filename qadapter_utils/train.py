"""Training adapters with `adapters.AdapterTrainer`: defaults per device, evaluation before and after, saving and
resuming without losing anyone's work.

    trainer = make_trainer(model, tokenizer, train, evaluation, max_steps=200, learning_rate=1e-3)
    before = evaluate(model, tokenizer, evaluation)
    trainer.train()                                   # progress bar; trainer.state.log_history holds the curve
    after = evaluate(model, tokenizer, evaluation)
    history(trainer)                                  # a DataFrame to plot

Defaults (each one can be overridden by a keyword argument of make_trainer, which go to `TrainingArguments`):
on a CUDA GPU paged 8-bit AdamW ("paged_adamw_8bit": optimizer state in 8 bits, paged to CPU memory under memory
pressure), bf16 or fp16 mixed precision following `qadapter_utils.env.default_compute_dtype()` (fp16 on GPUs
without bf16, e.g. Colab's T4), and gradient checkpointing (non-reentrant); on the CPU plain AdamW in fp32 without
checkpointing (it saves memory at the price of a second forward pass, and the CPU examples are small).
Packing (padding-free batches) is on by default; see qadapter_utils.data.make_collator.

What this module writes by hand, because no library does it: the exact-match task accuracy (teacher-forced, one
forward pass per batch; equivalent to greedy generation followed by end-of-sequence), the step timer and memory
callback, and the guard that refuses to write into a folder holding someone's earlier checkpoints.

Introduced in notebooks/04_training.ipynb. Needs qadapter_utils.data (tokenization, collators).
"""
from __future__ import annotations

import functools
import math
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
from transformers import TrainerCallback, TrainingArguments

from qadapter_utils.data import IGNORE_INDEX, make_collator, tokenize_dataset

# ---------------------------------------------------------------------------------------------------------------
# the trainer


def _compute_dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def default_arguments(model=None, device: str | None = None, compute_dtype: torch.dtype | None = None) -> dict:
    """The TrainingArguments keywords make_trainer starts from on `device` ("cuda" or "cpu"; default: where
    `model` lives, else "cuda" when a GPU is usable). On CUDA the mixed-precision flag follows `compute_dtype`
    (default: the model's compute dtype, else qadapter_utils.env.default_compute_dtype()). (04_training)"""
    if device is None:
        if model is not None:
            device = model.get_input_embeddings().weight.device.type
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    args = dict(
        max_steps=200, per_device_train_batch_size=16, per_device_eval_batch_size=32, learning_rate=2e-4,
        lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=10, logging_first_step=True, eval_strategy="no", eval_steps=50,
        save_strategy="steps", save_steps=100, save_total_limit=None,   # None: never delete a checkpoint
        report_to="none", disable_tqdm=False, seed=0, data_seed=0,
        remove_unused_columns=False,   # our collators pick input_ids/labels themselves
        label_names=["labels"], prediction_loss_only=True,   # do not keep eval logits (vocab x tokens floats)
        dataloader_num_workers=0,
    )
    if device == "cuda":
        dtype = compute_dtype or (_compute_dtype(model) if model is not None else None)
        if dtype is None:
            from qadapter_utils.env import default_compute_dtype

            dtype = default_compute_dtype("cuda")
        args.update(optim="paged_adamw_8bit", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                    gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        args.update(optim="adamw_torch", bf16=False, fp16=False, gradient_checkpointing=False,
                    use_cpu=not torch.cuda.is_available() or device == "cpu")
    return args


def _existing_work(folder: Path) -> list[str]:
    """Names in `folder` that look like saved training work (checkpoints, adapters, weights)."""
    if not folder.is_dir():
        return []
    marks = ("checkpoint-", "adapter_config.json", "pytorch_adapter", "adapter_model", "model.safetensors",
             "trainer_state.json")
    return sorted(p.name for p in folder.iterdir() if any(p.name.startswith(m) for m in marks)
                  or (p.is_dir() and (p / "adapter_config.json").exists()))


def make_trainer(model, tokenizer, train, eval=None, *, packing: bool = True, max_length: int | None = 256,
                 callbacks: Sequence[TrainerCallback] = (), resume: bool = False, chunked_loss: bool = False,
                 chunk_size: int = 2048, **overrides):
    """An `adapters.AdapterTrainer` for `model` (with an adapter set to train, e.g. by
    qadapter_utils.methods.add_adapter) on `train` / `eval` (datasets or lists of prompt/answer rows, or rows
    already tokenized with input_ids/labels).

    Defaults come from default_arguments (per device); `overrides` go to TrainingArguments (max_steps,
    learning_rate, per_device_train_batch_size, output_dir, ...). output_dir defaults to a new temporary folder.
    An output_dir that already holds checkpoints or adapters raises an error unless resume=True (continue with
    `trainer.train(resume_from_checkpoint=True)`) or overwrite_output_dir=True; save_total_limit defaults to None,
    so no checkpoint is ever deleted; checkpoints hold the adapters without a copy of the frozen lm_head. With
    eval given, eval_strategy defaults to "steps". packing=True batches without padding (data.make_collator). A
    StepStats callback records time per step and peak memory; read it with step_stats(trainer). chunked_loss=True
    computes lm_head and the loss `chunk_size` tokens at a time (qadapter_utils.loss), so the full fp32 logits
    (tokens x vocab x 4 bytes, twice) never exist: what limits the sequence length of a 7B model on a 16 GB GPU.
    (04_training)"""
    if not hasattr(model, "adapters_config") or model.active_adapters is None:
        raise ValueError("the model has no active adapter: add one first, e.g. "
                         "qadapter_utils.methods.add_adapter(model, 'lora') (it also sets it to train)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter of the model requires grad: call model.train_adapter(name) (add_adapter "
                         "does) or model.train_adapter_fusion(...) before make_trainer")
    if "evaluation_strategy" in overrides:
        raise ValueError("`evaluation_strategy` no longer exists in transformers 4.57 (it was renamed "
                         "`eval_strategy`): pass eval_strategy=... instead")
    args = default_arguments(model)
    if eval is not None:
        args["eval_strategy"] = "steps"
    user_dir = overrides.pop("output_dir", None)
    overwrite = overrides.pop("overwrite_output_dir", False)
    if "num_train_epochs" in overrides and "max_steps" not in overrides:
        args["max_steps"] = -1   # train for epochs: max_steps > 0 would override them
    args.update(overrides)
    if "warmup_steps" not in overrides and "warmup_ratio" not in overrides:  # 5% linear warmup
        if args["max_steps"] > 0:
            args["warmup_steps"] = max(1, int(args["max_steps"]) // 20)
        else:
            args["warmup_ratio"] = 0.05
    if user_dir is None:
        output_dir = Path(tempfile.mkdtemp(prefix="qadapter-run-"))
    else:
        output_dir = Path(user_dir).expanduser()
        found = _existing_work(output_dir)
        if found and not (resume or overwrite):
            raise FileExistsError(
                f"output_dir {output_dir.name!r} already holds saved work ({', '.join(found[:4])}"
                f"{', ...' if len(found) > 4 else ''}); nothing was changed. Pass resume=True and call "
                f"trainer.train(resume_from_checkpoint=True) to continue it, choose another output_dir, or pass "
                f"overwrite_output_dir=True to write next to it (old checkpoints are still never deleted unless "
                f"you set save_total_limit).")
    arguments = TrainingArguments(output_dir=str(output_dir), **args)

    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id   # what the Trainer would do, with a log line each time
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    train = _as_tokenized(train, tokenizer, max_length)
    eval = _as_tokenized(eval, tokenizer, max_length) if eval is not None else None
    stats = StepStats()
    trainer = _trainer_class()(model=model, args=arguments, train_dataset=train, eval_dataset=eval,
                             data_collator=make_collator(tokenizer, packing=packing), processing_class=tokenizer,
                             callbacks=[stats, *callbacks])
    if chunked_loss:
        from qadapter_utils.loss import chunked_compute_loss

        trainer.compute_loss = functools.partial(chunked_compute_loss, chunk_size=chunk_size)
    return trainer


@functools.cache
def _trainer_class():
    """adapters.AdapterTrainer whose checkpoints hold the adapters without a copy of the base's frozen lm_head:
    AdapterTrainer saves it into every checkpoint of a causal LM (pytorch_model_head.bin, 262 MB for Llama-2-7B
    in fp16, next to a 33 MB LoRA) and loads it back over the model's own on resume."""
    from adapters import AdapterTrainer

    from qadapter_utils.methods import _without_head

    class CheckpointAdapterOnlyTrainer(AdapterTrainer):
        def _save(self, output_dir=None, state_dict=None):
            save_all = getattr(self.model, "save_all_adapters", None)
            if save_all is None or not _without_head(save_all):
                return super()._save(output_dir, state_dict)
            self.model.save_all_adapters = functools.partial(save_all, with_head=False)  # this call only
            try:
                return super()._save(output_dir, state_dict)
            finally:
                del self.model.save_all_adapters

    return CheckpointAdapterOnlyTrainer


def _as_tokenized(dataset, tokenizer, max_length):
    if dataset is None:
        return None
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: pass at least one prompt/answer row")
    first = dataset[0]
    if "input_ids" in first and "labels" in first:
        return dataset
    return tokenize_dataset(dataset, tokenizer, max_length=max_length)


# ---------------------------------------------------------------------------------------------------------------
# what the run measured


class StepStats(TrainerCallback):
    """Time per optimizer step (wall clock; evaluation and saving excluded) and the memory training needs.

    Memory: on CUDA the real `torch.cuda.max_memory_allocated()` (reset when training starts; includes the base
    model). On the CPU there is no allocator counter, and the process's RSS mostly shows memory the allocator
    reuses, so the callback reports what training adds to the frozen model, counted exactly: the tensors autograd
    saves for the backward pass during the first optimizer step (distinct storages, model weights excluded)
    plus the trainable weights, their gradients and two fp32 AdamW moments each. Temporary buffers are not
    counted. (04_training)"""

    def __init__(self):
        self.step_seconds: list[float] = []
        self.peak_bytes: int | None = None
        self.activation_bytes: int | None = None
        self.state_bytes: int | None = None
        self.memory_kind = ""
        self._t0 = None
        self._hooks = None
        self._seen: set[int] = set()
        self._weights: set[int] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.memory_kind = "CUDA peak allocated (whole model)"
            return
        self.memory_kind = "activations saved for backward + adapter weights, grads, AdamW state"
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.state_bytes = sum(p.numel() * (2 * p.element_size() + 8) for p in trainable)
        self._weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._weights and key not in self._seen:
            self._seen.add(key)
            self.activation_bytes += storage.nbytes()
        return tensor

    def on_step_begin(self, args, state, control, **kwargs):
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        elif self.activation_bytes is None:  # count what the first step saves for backward
            self.activation_bytes = 0
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
            self._hooks.__enter__()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        if self._t0 is not None:
            self.step_seconds.append(time.perf_counter() - self._t0)
            self._t0 = None
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
            self._seen.clear()
            self.peak_bytes = self.activation_bytes // max(1, args.gradient_accumulation_steps) + self.state_bytes

    def on_train_end(self, args, state, control, **kwargs):
        if args.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated()
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def summary(self) -> dict:
        """{"steps", "seconds per step" (median, first step excluded when there are more), "peak MiB",
        "memory measure"}."""
        times = self.step_seconds[1:] if len(self.step_seconds) > 1 else self.step_seconds
        median = sorted(times)[len(times) // 2] if times else float("nan")
        peak = self.peak_bytes / 2**20 if self.peak_bytes is not None else float("nan")
        return {"steps": len(self.step_seconds), "seconds per step": median, "peak MiB": peak,
                "memory measure": self.memory_kind}


def step_stats(trainer) -> dict:
    """StepStats.summary() of the StepStats callback make_trainer installed. (04_training)"""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, StepStats):
            return callback.summary()
    raise ValueError("this trainer has no StepStats callback: build it with make_trainer")


def history(trainer):
    """The trainer's log history as a pandas DataFrame indexed by step, with columns loss, eval_loss,
    learning_rate, grad_norm (NaN where a step logged none of them). (04_training)"""
    import pandas as pd

    rows = [r for r in trainer.state.log_history if "step" in r]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["loss", "eval_loss", "learning_rate", "grad_norm"])
    keep = [c for c in ("loss", "eval_loss", "learning_rate", "grad_norm") if c in frame]
    return frame.groupby("step")[keep].first()


def plot_histories(histories: dict, ax=None, eval_too: bool = True):
    """Training loss curves of several runs ({label: history DataFrame}) in one matplotlib axes; eval loss as
    dots in the same colour. Returns the axes. (04_training)"""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for label, frame in histories.items():
        line = None
        if "loss" in frame:
            series = frame["loss"].dropna()
            (line,) = ax.plot(series.index, series.values, label=f"{label} (train)")
        if eval_too and "eval_loss" in frame:
            series = frame["eval_loss"].dropna()
            ax.plot(series.index, series.values, "o", color=line.get_color() if line else None,
                    label=f"{label} (eval)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


# ---------------------------------------------------------------------------------------------------------------
# evaluation: loss, perplexity, task accuracy, generations


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _batches(rows: Sequence[dict], batch_size: int) -> Iterable[list[dict]]:
    for i in range(0, len(rows), batch_size):
        yield rows[i:i + batch_size]


@torch.no_grad()
def evaluate(model, tokenizer, dataset, batch_size: int = 32, max_length: int | None = 256) -> dict:
    """Evaluate `model` on prompt/answer rows (or rows tokenized by data.tokenize_dataset) with the prompt
    masked out: returns {"eval_loss": mean loss per answer token, "perplexity": exp(eval_loss), "accuracy":
    exact-match rate, "accuracy <kind>": the same per question kind (when rows have "kind"), "examples": n}.

    Exact match is teacher-forced: an example counts as correct when, at every answer position and at the
    end-of-sequence token, the model's most likely next token is the reference one, which is exactly when
    greedy generation would produce the answer's tokens and then stop. One packed forward pass per batch
    (no padding, use_cache=False so transformers keeps the samples apart). The model is put in eval mode and
    its train/eval mode restored afterwards. (04_training)"""
    rows = _as_tokenized(dataset, tokenizer, max_length)
    rows = list(rows) if not isinstance(rows, list) else rows
    if not rows:
        raise ValueError("evaluate needs at least one example")
    was_training = model.training
    model.eval()
    device = _device(model)
    total_loss, total_tokens = 0.0, 0
    correct: dict[str, list[bool]] = {}
    try:
        for batch in _batches(rows, batch_size):
            ids = torch.tensor([t for r in batch for t in r["input_ids"]], device=device)[None]
            positions = torch.tensor([p for r in batch for p in range(len(r["input_ids"]))], device=device)[None]
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0].float()
            start = 0
            for r in batch:
                n = len(r["input_ids"])
                labels = torch.tensor(r["labels"][1:], device=device)   # label t+1 is predicted at position t
                pred = logits[start:start + n - 1]
                mask = labels != IGNORE_INDEX
                loss = torch.nn.functional.cross_entropy(pred[mask], labels[mask], reduction="sum")
                total_loss += loss.item()
                total_tokens += int(mask.sum())
                ok = bool((pred[mask].argmax(-1) == labels[mask]).all())
                correct.setdefault(r.get("kind", "all"), []).append(ok)
                start += n
    finally:
        model.train(was_training)
    mean_loss = total_loss / max(1, total_tokens)
    flat = [c for v in correct.values() for c in v]
    out = {"eval_loss": mean_loss, "perplexity": math.exp(mean_loss), "accuracy": sum(flat) / len(flat),
           "examples": len(flat)}
    if len(correct) > 1 or "all" not in correct:
        for kind in sorted(correct):
            out[f"accuracy {kind}"] = sum(correct[kind]) / len(correct[kind])
    return out


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16,
                     use_cache: bool = False) -> list[str]:
    """Greedy answers of `model` to `prompts` (formatted prompts, e.g. rows' "prompt"), one prompt at a time
    (no padding), stopping at end-of-sequence; returns the generated text without the prompt, stripped.

    use_cache=False by default: adapters 1.3.0's Llama layers take the KV cache as `past_key_value`, while
    transformers 4.57 passes `past_key_values`, so after `adapters.init` a cached generate() silently drops the
    cache and every new token sees only itself (adapter-hub/adapters#824; notebook 04 shows it). Without the
    cache each step recomputes the whole sequence: slower, but correct for any model. A merged model
    (qadapter_utils.merge.merge_lora) has no adapters layers and generates correctly with the cache.
    (04_training)"""
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(_device(model))
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache,
                                       eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------------
# saving and resuming


def save_trained_adapter(model, name: str, directory: str | Path, overwrite: bool = False) -> Path:
    """Save adapter `name` alone (config + weights as safetensors, not the base's lm_head: a few MB even for
    Llama 2-7B) to `directory` with methods.save_adapter and return it. Refuses (FileExistsError, nothing
    written) when `directory` already holds files, unless overwrite=True. Load it back with
    qadapter_utils.methods.load_adapter. (04_training)"""
    from qadapter_utils.methods import save_adapter

    directory = Path(directory).expanduser()
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory.name!r} is not empty ({', '.join(sorted(p.name for p in directory.iterdir())[:4])}"
                              f"); nothing was written. Choose another folder or pass overwrite=True.")
    if name not in model.adapters_config:
        raise ValueError(f"the model has no adapter {name!r}; it has {list(model.adapters_config.adapters)}")
    return save_adapter(model, name, directory)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The Trainer checkpoints (checkpoint-<step> folders) in `output_dir`, oldest first. (04_training)"""
    folder = Path(output_dir)
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


class StopAfterStep(TrainerCallback):
    """Stop training after optimizer step `step`, saving a checkpoint there: simulates an interruption (a Colab
    disconnect, a pre-empted job) in the notebook and the resume test. (04_training)"""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control
