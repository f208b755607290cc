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
Packing (padding-free batches) is on by default; see qadapter_utils.data.make_collator. On a CUDA GPU the fast
recipe's chunked loss and packed attention are on as well (fast_defaults; qadapter_utils.fast).

What this module writes by hand, because no library does it: the exact-match task accuracy (teacher-forced, one
forward pass per batch; equivalent to greedy generation followed by end-of-sequence), the step timer and memory
callback, and the guards: a run's identity (model, adapters, data, the arguments that shape training) is recorded
in its output folder (qadapter_run.json), and no call writes over or resumes another run's checkpoints, even with
overwrite_output_dir=True; a checkpoint torn by a kill during its write is named when resuming; a max_length that
would cut answers (their end-of-sequence token) or drop rows, and a budget that would not train as asked
(max_steps=0, a non-finite learning rate) are refused before anything runs.

Introduced in notebooks/05_training.ipynb. Needs data (tokenization, collators), guards (errors,
folder checks), methods (saving adapters, decoder layers), weights (4-bit layers kept trainable on CPUs where
bitsandbytes repacks them for inference), env (compute dtype), loss (chunked_loss=True) and fast (the fast
recipe's switches).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

try:  # inside the qadapter_utils package
    from . import fast
    from .data import IGNORE_INDEX, TokenBatchSampler, make_collator, tokenize_dataset
    from .env import default_compute_dtype
    from .guards import IntegrityError, SavedWorkError, UsageError, check_number, describe, saved_work
    from .loss import chunked_compute_loss
    from .methods import cast_hooks_suspended, decoder_layers, save_adapter, without_head
    from .weights import keep_4bit_layers_trainable
except ImportError:  # copied next to its siblings (the copy-alone rule: qadapter_utils/__init__.py)
    import fast
    from data import IGNORE_INDEX, TokenBatchSampler, make_collator, tokenize_dataset
    from env import default_compute_dtype
    from guards import IntegrityError, SavedWorkError, UsageError, check_number, describe, saved_work
    from loss import chunked_compute_loss
    from methods import cast_hooks_suspended, decoder_layers, save_adapter, without_head
    from weights import keep_4bit_layers_trainable

# ---------------------------------------------------------------------------------------------------------------
# the trainer


def _compute_dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def default_arguments(model=None, device: str | None = None, compute_dtype: torch.dtype | None = None) -> dict:
    """The TrainingArguments keywords make_trainer starts from on `device` ("cuda" or "cpu"; default: where
    `model` lives, else "cuda" when a GPU is usable). On CUDA the mixed-precision flag follows `compute_dtype`
    (default: the model's compute dtype, else qadapter_utils.env.default_compute_dtype()). (05_training)"""
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
            dtype = default_compute_dtype("cuda")
        args.update(optim="paged_adamw_8bit", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                    gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        args.update(optim="adamw_torch", bf16=False, fp16=False, gradient_checkpointing=False,
                    use_cpu=not torch.cuda.is_available() or device == "cpu")
    return args


RUN_FILE = "qadapter_run.json"
#: TrainingArguments that shape the trajectory of a run (logging, saving and evaluation settings do not).
TRAJECTORY_ARGUMENTS = ("max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
                        "gradient_accumulation_steps", "seed", "data_seed", "lr_scheduler_type", "warmup_steps",
                        "warmup_ratio", "weight_decay", "optim", "max_grad_norm", "bf16", "fp16")


def run_identity(model, train, arguments: TrainingArguments, packing: bool) -> dict:
    """What makes two runs the same run: the base model (name, class, quantization), the adapters (configs, the
    active setup), a hash of the tokenized training rows, packing and TRAJECTORY_ARGUMENTS. Resuming needs equal
    identities; logging, saving and evaluation settings may differ. (05_training)"""
    configs = {n: model.adapters_config.get(n) for n in model.adapters_config.adapters}
    quant = getattr(model.config, "quantization_config", None)
    digest = hashlib.sha256()
    for row in train:
        digest.update(json.dumps([list(row["input_ids"]), list(row["labels"])]).encode())
    return json.loads(json.dumps({
        "model": {"name": Path(str(getattr(model.config, "_name_or_path", ""))).name,
                  "class": type(model).__name__,
                  "quantization": quant.to_dict() if hasattr(quant, "to_dict") else quant},
        "adapters": {"active": str(model.active_adapters), "configs": configs},
        "data": {"rows": len(train), "sha256": digest.hexdigest()}, "packing": packing,
        "training": {k: getattr(arguments, k) for k in TRAJECTORY_ARGUMENTS}}, default=str, sort_keys=True))


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {str(x)[:40]} there, {str(y)[:40]} now")
    return out


def _recorded_identity(folder: Path) -> dict | None:
    file = folder / RUN_FILE
    try:
        return json.loads(file.read_text())["identity"] if file.exists() else None
    except (ValueError, KeyError):
        return None


def _claim_output_dir(folder: Path, identity: dict, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding another run's work (or unknown work) unless it is this run's and resume or
    overwrite was asked for; then record this run's identity in it. Nothing is written when refusing."""
    found = [n for n in saved_work(folder) if n != RUN_FILE]
    recorded = _recorded_identity(folder)
    if found:
        if recorded is None:
            raise SavedWorkError(
                f"output_dir {folder.name!r} already holds saved work ({describe(found)}) that make_trainer did not "
                f"record (no {RUN_FILE}), so it may be another run's; nothing was changed. Choose another "
                f"output_dir{'' if (resume or overwrite) else ' (pass resume=True to continue a run of make_trainer)'}"
                f", or pass a checkpoint explicitly: trainer.train(resume_from_checkpoint=path).")
        differences = _differences(recorded, identity)
        if differences:
            raise SavedWorkError(
                f"output_dir {folder.name!r} holds another run's checkpoints ({describe(found)}), which neither "
                f"resume=True nor overwrite_output_dir=True may continue or replace; nothing was changed. That run "
                f"differs in {describe(differences, 3)}. Choose another output_dir for this run.")
        if not (resume or overwrite):
            raise SavedWorkError(
                f"output_dir {folder.name!r} already holds saved work ({describe(found)}); nothing was changed. "
                f"Pass resume=True and call trainer.train(resume_from_checkpoint=True) to continue it, choose "
                f"another output_dir, or pass overwrite_output_dir=True to write next to it (old checkpoints are "
                f"still never deleted unless you set save_total_limit).")
    folder.mkdir(parents=True, exist_ok=True)
    # a temporary file of this call's own: under data parallelism every process claims the same folder at once
    # (with one shared temporary name, one process's rename took the file from under the other's)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{RUN_FILE}.", suffix=".writing")
    with os.fdopen(handle, "w") as f:
        f.write(json.dumps({"identity": identity}, indent=1))
    os.replace(tmp, folder / RUN_FILE)


def _check_budget(args: dict, max_length) -> None:
    """Refuse arguments that would silently train other than asked."""
    if max_length is not None:
        check_number("max_length", max_length, low=1, integer=True,
                     hint="tokens per example, or None to keep every example whole")
    epochs = args.get("num_train_epochs")
    if args["max_steps"] != -1 or epochs is None:
        check_number("max_steps", args["max_steps"], low=1, integer=True,
                     hint="optimizer steps (or max_steps=-1 with num_train_epochs=... to train for epochs)")
    if args["max_steps"] == -1:
        check_number("num_train_epochs", epochs, low=0, low_open=True, hint="e.g. num_train_epochs=3")
    check_number("learning_rate", args["learning_rate"], low=0, low_open=True,
                 hint="a positive finite number, e.g. 2e-4 for LoRA on Llama-2-7B")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        check_number(key, args.get(key, 1), low=1, integer=True, hint="a whole number of examples/steps, e.g. 8")


def make_trainer(model, tokenizer, train, eval=None, *, packing: bool = True, max_length: int | None = 256,
                 callbacks: Sequence[TrainerCallback] = (), resume: bool = False, chunked_loss: bool | None = None,
                 chunk_size: int = 2048, packed_attention: bool | None = None, tiled_mlp: int | None = None,
                 offload_checkpoints: bool = False,
                 checkpoint_layers: int | None = None, tokens_per_step: int | None = None, **overrides):
    """An `adapters.AdapterTrainer` for `model` (with an adapter set to train, e.g. by
    qadapter_utils.methods.add_adapter) on `train` / `eval` (datasets or lists of prompt/answer rows, or rows
    already tokenized with input_ids/labels).

    Defaults come from default_arguments (per device); `overrides` go to TrainingArguments (max_steps,
    learning_rate, per_device_train_batch_size, output_dir, ...). output_dir defaults to a new temporary folder.
    An output_dir that already holds saved work (checkpoints, adapters, weights, a tokenizer) raises
    guards.SavedWorkError unless it is this run's (same run_identity, recorded in qadapter_run.json) and
    resume=True (continue with `trainer.train(resume_from_checkpoint=True)`) or overwrite_output_dir=True;
    another run's checkpoints are never continued or replaced. save_total_limit defaults to None, so no checkpoint
    is ever deleted; checkpoints hold the adapters without a copy of the frozen lm_head. Raw rows are tokenized
    with `max_length`; one that would cut an answer or drop a row raises guards.UsageError naming the smallest
    max_length that keeps every row (tokenize with data.tokenize_dataset yourself to truncate on purpose).
    max_steps, learning_rate and batch sizes are checked before anything runs. With
    eval given, eval_strategy defaults to "steps". packing=True batches without padding (data.make_collator). A
    StepStats callback records time per step and peak memory; read it with step_stats(trainer).

    The fast recipe (qadapter_utils.fast, qadapter_utils.loss; measured in benchmarks/recipe_vs_peft.py and
    benchmarks/t4_check.py). None means the default of the model's device (fast_defaults): on a CUDA GPU
    chunked_loss and packed_attention are on, on the CPU off (the CPU examples are small and the notebooks show
    both ways there). chunked_loss=True computes lm_head and the loss `chunk_size` tokens at a time
    (qadapter_utils.loss), so the full fp32 logits (tokens x vocab x 4 bytes, twice) never exist: what limits the
    sequence length of a 7B model on a 16 GB GPU. packed_attention=True switches the model to fast.PACKED_ATTENTION
    (each sample of a packed row attends only to itself, from the position ids; varlen flash kernel on a CUDA GPU;
    needs packing=True, refuses prefix tuning; its default is on only where it applies); the model keeps it after
    training (fast.set_attention(model, "sdpa") switches back; evaluation and generation are exact under it). In
    mixed precision (bf16/fp16, the CUDA default) training runs without the input casts at the adapters' edges
    (methods.cast_hooks_suspended: a round trip under autocast), which are back when train() returns.
    Off by default, because they trade speed for memory: tiled_mlp=N runs every MLP over tiles of N tokens, each
    checkpointed (fast.tile_mlp; fast.untile_mlp removes it). offload_checkpoints=True runs the forward under
    fast.offload_checkpoints (what it saves for backward waits in CPU memory). checkpoint_layers=n checkpoints only
    the first n decoder layers (fast.checkpoint_layers, applied when training starts, after the Trainer enables
    checkpointing on all of them); it turns gradient checkpointing on (non-reentrant) unless
    gradient_checkpointing=False is passed, which with n > 0 is refused. tokens_per_step=T (needs packing=True)
    forms each training batch from whole samples up to T tokens (data.TokenBatchSampler: the rows in a random order
    filled greedily, per_device_train_batch_size is then unused; an optimizer step sees gradient_accumulation_steps
    such batches); memory.plan_tokens_per_step chooses T and checkpoint_layers for a memory budget. (05_training)"""
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
    if checkpoint_layers is not None:
        if overrides.get("gradient_checkpointing") is False and checkpoint_layers:
            raise UsageError(f"checkpoint_layers={checkpoint_layers} needs gradient checkpointing, but "
                             f"gradient_checkpointing=False was passed: drop one of them")
        args.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    args.update(overrides)
    _check_budget(args, max_length)
    defaults = fast_defaults(model, packing)
    chunked_loss = defaults["chunked_loss"] if chunked_loss is None else chunked_loss
    packed_attention = defaults["packed_attention"] if packed_attention is None else packed_attention
    switches = dict(packed_attention=packed_attention, tiled_mlp=tiled_mlp, checkpoint_layers=checkpoint_layers)
    _fast_pieces(model, packing, **switches, apply=False)  # misuse refused before anything is written
    if tokens_per_step is not None:
        check_number("tokens_per_step", tokens_per_step, low=1, integer=True,
                     hint="tokens per training batch, at least the longest row (or None: per_device_train_batch_size "
                          "rows per batch)")
        if not packing:
            raise UsageError("tokens_per_step needs packing=True (padded batches are counted in rows: use "
                             "per_device_train_batch_size)")
    if "warmup_steps" not in overrides and "warmup_ratio" not in overrides:  # 5% linear warmup
        if args["max_steps"] > 0:
            args["warmup_steps"] = max(1, int(args["max_steps"]) // 20)
        else:
            args["warmup_ratio"] = 0.05
    output_dir = Path(user_dir).expanduser() if user_dir is not None else None
    if output_dir is not None and saved_work(output_dir) and _recorded_identity(output_dir) is None:
        _claim_output_dir(output_dir, {}, resume, overwrite)  # unknown work: refused before tokenizing anything
    train = _as_tokenized(train, tokenizer, max_length)
    eval = _as_tokenized(eval, tokenizer, max_length) if eval is not None else None
    if output_dir is None:
        output_dir = Path(tempfile.mkdtemp(prefix="qadapter-run-"))
    _precision_of_this_trainer(args)
    arguments = TrainingArguments(output_dir=str(output_dir), **args)
    identity = run_identity(model, train, arguments, packing)
    if tokens_per_step is not None:
        longest = max(len(row["input_ids"]) for row in train)
        if longest > tokens_per_step:
            raise UsageError(f"tokens_per_step={tokens_per_step} is below the longest training row ({longest} "
                             f"tokens): pass tokens_per_step >= {longest}")
        identity["tokens_per_step"] = tokens_per_step  # it shapes the trajectory like the batch size does
    _claim_output_dir(output_dir, identity, resume, overwrite)

    keep_4bit_layers_trainable(model)  # evaluations during training must not cut the gradient (AVX512-BF16 CPUs)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id   # what the Trainer would do, with a log line each time
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    stats = StepStats()
    fast_pieces = _fast_pieces(model, packing, **switches, apply=True)
    trainer = _trainer_class()(model=model, args=arguments, train_dataset=train, eval_dataset=eval,
                             data_collator=make_collator(tokenizer, packing=packing), processing_class=tokenizer,
                             callbacks=[stats, *fast_pieces, *callbacks])
    trainer.qadapter_identity = identity
    trainer.qadapter_tokens_per_step = tokens_per_step
    if getattr(trainer, "is_fsdp_enabled", False):  # launched with an FSDP config (accelerate)
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_wrap_policy(model)
    if chunked_loss:
        # computed inside model.forward (loss.causal_lm_loss), so under accelerate's autocast around it
        trainer.compute_loss = functools.partial(chunked_compute_loss, chunk_size=chunk_size)
    if offload_checkpoints:
        trainer.compute_loss = fast.offloaded(trainer.compute_loss)
    return trainer


def fsdp_wrap_policy(model):
    """The FSDP auto-wrap policy make_trainer gives accelerate when launched with FSDP: every decoder layer is a unit,
    and so is every module holding trainable parameters of its own (the adapters' weights). FSDP flattens each
    unit's parameters into one tensor of one dtype, so with the decoder layers alone it refuses fp32 adapters in a
    bf16 or 4-bit (bf16-stored) base: "Must flatten tensors with uniform dtype" (tests/test_distributed.py).
    (08_multi_gpu)"""
    layer_classes = tuple({type(layer) for layer in decoder_layers(model)})

    def policy(module, recurse, nonwrapped_numel):
        if recurse:
            return True
        return isinstance(module, layer_classes) or any(p.requires_grad for p in module.parameters(recurse=False))

    return policy


def _precision_of_this_trainer(args: dict) -> None:
    """Make the next Trainer run the precision `args` ask for. TrainingArguments(bf16=True) writes
    ACCELERATE_MIXED_PRECISION=bf16 into the environment and a later TrainingArguments(bf16=False) reads it back as
    its own default, and accelerate keeps one AcceleratorState per process: a full-precision Trainer built after a
    bf16 one trained in bf16 (transformers 4.57.6, accelerate 1.15.0). Both are set to this trainer's precision."""
    from accelerate.state import AcceleratorState

    wanted = "bf16" if args.get("bf16") else "fp16" if args.get("fp16") else "no"
    os.environ["ACCELERATE_MIXED_PRECISION"] = wanted
    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and str(getattr(held, "value", held)) != wanted:
        AcceleratorState._reset_state()


def fast_defaults(model, packing: bool = True, device: str | None = None) -> dict:
    """make_trainer's defaults for chunked_loss and packed_attention on `device` (default: where the model is).
    On a CUDA GPU both on: the chunked loss never builds the fp32 logits, packed attention never builds a
    (tokens x tokens) mask and runs the varlen kernel; packed_attention only with packing=True, for a model whose
    attention dispatches through transformers' AttentionInterface and that holds no prefix tuning (adapters 1.3.0
    computes it right only under eager attention). On the CPU both off. Measured on a GPU through make_trainer:
    benchmarks/results/recipe_vs_peft_<gpu>.md. (05_training)"""
    if device is None:
        device = model.get_input_embeddings().weight.device.type
    on_gpu = device == "cuda"
    applies = (packing and getattr(model, "_supports_attention_backend", False)
               and fast.prefix_tuning_adapter(model) is None)
    return {"chunked_loss": on_gpu, "packed_attention": on_gpu and bool(applies)}


def _fast_pieces(model, packing: bool, *, packed_attention: bool, tiled_mlp, checkpoint_layers,
                 apply: bool) -> list:
    """Check make_trainer's switches of qadapter_utils.fast (apply=False) or apply them to `model` (apply=True);
    returns the callbacks that must act when training starts."""
    if not (packed_attention or tiled_mlp is not None or checkpoint_layers is not None):
        return []
    if packed_attention and not packing:
        raise UsageError("packed_attention=True needs packing=True (it keeps the samples of a packed row apart; "
                         "padded batches gain nothing from it)")
    if tiled_mlp is not None:
        check_number("tiled_mlp", tiled_mlp, low=1, integer=True, hint="tokens per MLP tile, e.g. 4096")
    layers = decoder_layers(model)
    if checkpoint_layers is not None:
        check_number("checkpoint_layers", checkpoint_layers, low=0, high=len(layers), integer=True,
                     hint=f"a number of decoder layers from 0 to {len(layers)}")
    if not apply:
        return []
    if packed_attention:
        fast.use_packed_attention(model)
    if tiled_mlp is not None:
        fast.tile_mlp(model, tiled_mlp)
    return [_CheckpointLayers(checkpoint_layers)] if checkpoint_layers is not None else []


class _CheckpointLayers(TrainerCallback):
    """fast.checkpoint_layers(model, n) when training starts: the Trainer has just enabled gradient checkpointing
    on every layer (model.gradient_checkpointing_enable), which would undo a choice made before."""

    def __init__(self, n: int):
        self.n = n

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        fast.checkpoint_layers(model, self.n)


@functools.cache
def _trainer_class():
    """adapters.AdapterTrainer whose checkpoints hold the adapters without a copy of the base's frozen lm_head:
    AdapterTrainer saves it into every checkpoint of a causal LM (pytorch_model_head.bin, 262 MB for Llama-2-7B
    in fp16, next to a 33 MB LoRA) and loads it back over the model's own on resume."""
    from adapters import AdapterTrainer

    class CheckpointAdapterOnlyTrainer(AdapterTrainer):
        def train(self, resume_from_checkpoint=None, **kwargs):
            if resume_from_checkpoint:  # True (the latest in output_dir) or a path
                checkpoint = _checkpoint_to_resume(self.args.output_dir, resume_from_checkpoint)
                if checkpoint is not None:
                    _check_resumable(checkpoint, getattr(self, "qadapter_identity", None))
                    resume_from_checkpoint = str(checkpoint)
            mixed_precision = self.args.bf16 or self.args.fp16  # autocast: the input casts are a round trip
            with cast_hooks_suspended(self.model) if mixed_precision else contextlib.nullcontext():
                return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

        def get_train_dataloader(self):
            tokens = getattr(self, "qadapter_tokens_per_step", None)
            if tokens is None:
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = TokenBatchSampler([len(row["input_ids"]) for row in self.train_dataset], tokens, seed)
            return self.accelerator.prepare(DataLoader(
                self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory))

        def _save(self, output_dir=None, state_dict=None):
            save_all = getattr(self.model, "save_all_adapters", None)
            if save_all is None or not without_head(save_all):
                return super()._save(output_dir, state_dict)
            self.model.save_all_adapters = functools.partial(save_all, with_head=False)  # this call only
            try:
                return super()._save(output_dir, state_dict)
            finally:
                del self.model.save_all_adapters

    return CheckpointAdapterOnlyTrainer


def _checkpoint_to_resume(output_dir, resume_from_checkpoint) -> Path | None:
    if resume_from_checkpoint is True:
        found = checkpoints(output_dir)
        return found[-1] if found else None  # none: the Trainer's own error says so
    return Path(resume_from_checkpoint).expanduser()


def _check_resumable(checkpoint: Path, identity: dict | None) -> None:
    """Refuse a checkpoint of another run (its folder's qadapter_run.json differs) or one torn by a kill during
    its write (trainer_state.json, written last, missing or unreadable), naming it."""
    recorded = _recorded_identity(checkpoint.parent)
    if identity is not None and recorded is not None and _differences(recorded, identity):
        raise SavedWorkError(f"{checkpoint.parent.name}/{checkpoint.name} belongs to another run (it differs in "
                             f"{describe(_differences(recorded, identity), 3)}); resuming would continue that run "
                             f"with this one's settings. Resume with the settings it was started with, or start "
                             f"this run without resume_from_checkpoint.")
    state = checkpoint / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        earlier = [c for c in checkpoints(checkpoint.parent) if c != checkpoint and _complete(c)]
        hint = (f"trainer.train(resume_from_checkpoint={str(earlier[-1])!r})" if earlier else
                "train from the start")
        raise IntegrityError(f"checkpoint {checkpoint.parent.name}/{checkpoint.name} is torn: its write was "
                             f"interrupted (trainer_state.json, written last, is missing or incomplete). Resume "
                             f"from the last complete one: {hint}; move the torn folder aside first if you resume "
                             f"with resume_from_checkpoint=True (nothing is deleted for you).") from None


def _complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def _as_tokenized(dataset, tokenizer, max_length):
    """Rows tokenized with the prompt masked (rows already holding input_ids and labels are kept as they are).
    Refuses a max_length that would cut an answer's end or drop a row, naming the smallest that keeps all."""
    if dataset is None:
        return None
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: pass at least one prompt/answer row")
    first = dataset[0]
    if "input_ids" in first and "labels" in first:
        return dataset
    if max_length is not None:
        check_number("max_length", max_length, low=1, integer=True,
                     hint="tokens per example, or None to keep every example whole")
    tokenized, stats = tokenize_dataset(dataset, tokenizer, max_length=max_length, return_stats=True)
    if stats.truncated or stats.dropped:
        longest = tokenize_dataset(dataset, tokenizer, max_length=None, return_stats=True)[1].longest
        raise UsageError(f"max_length={max_length} would cut {stats.truncated} of {stats.examples} rows (their "
                         f"answer loses its end-of-sequence token, so the model would not learn to stop) and drop "
                         f"{stats.dropped} (no answer token left): pass max_length={longest} or more (the longest "
                         f"row), or to truncate on purpose tokenize the rows yourself with "
                         f"qadapter_utils.data.tokenize_dataset(rows, tokenizer, max_length={max_length}, "
                         f"verbose=True) and pass the result.")
    return tokenized


# ---------------------------------------------------------------------------------------------------------------
# what the run measured


class StepStats(TrainerCallback):
    """Time per optimizer step (wall clock; evaluation and saving excluded) and the memory training needs.

    Memory: on CUDA the real `torch.cuda.max_memory_allocated()` (reset when training starts; includes the base
    model). On the CPU there is no allocator counter, and the process's RSS mostly shows memory the allocator
    reuses, so the callback reports what training adds to the frozen model, counted exactly: the tensors autograd
    saves for the backward pass during the first optimizer step (distinct storages, model weights excluded)
    plus the trainable weights, their gradients and two fp32 AdamW moments each. Temporary buffers are not
    counted. (05_training)"""

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
    """StepStats.summary() of the StepStats callback make_trainer installed. (05_training)"""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, StepStats):
            return callback.summary()
    raise ValueError("this trainer has no StepStats callback: build it with make_trainer")


def history(trainer):
    """The trainer's log history as a pandas DataFrame indexed by step, with columns loss, eval_loss,
    learning_rate, grad_norm (NaN where a step logged none of them). (05_training)"""
    import pandas as pd

    rows = [r for r in trainer.state.log_history if "step" in r]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["loss", "eval_loss", "learning_rate", "grad_norm"])
    keep = [c for c in ("loss", "eval_loss", "learning_rate", "grad_norm") if c in frame]
    return frame.groupby("step")[keep].first()


def plot_histories(histories: dict, ax=None, eval_too: bool = True):
    """Training loss curves of several runs ({label: history DataFrame}) in one matplotlib axes; eval loss as
    dots in the same colour. Returns the axes. (05_training)"""
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


def _batches(rows: Sequence[dict], batch_size: int, max_tokens: int | None = None) -> Iterable[list[dict]]:
    """Consecutive rows, at most `batch_size` per batch and, when given, at most `max_tokens` tokens (a longer row
    goes alone)."""
    batch, tokens = [], 0
    for row in rows:
        n = len(row["input_ids"])
        if batch and (len(batch) == batch_size or (max_tokens and tokens + n > max_tokens)):
            yield batch
            batch, tokens = [], 0
        batch.append(row)
        tokens += n
    if batch:
        yield batch


@torch.no_grad()
def evaluate(model, tokenizer, dataset, batch_size: int = 32, max_length: int | None = 256,
             max_batch_tokens: int = 4096) -> dict:
    """Evaluate `model` on prompt/answer rows (or rows tokenized by data.tokenize_dataset) with the prompt
    masked out: returns {"eval_loss": mean loss per answer token, "perplexity": exp(eval_loss), "token accuracy":
    the share of answer tokens (end-of-sequence included) the model predicts right given the reference before them,
    "accuracy": exact-match rate, "accuracy <kind>": the same per question kind (when rows have "kind"),
    "examples": n}. On long free-form answers (e.g. guanaco) whole-answer exact match is about 0 for any model;
    loss, perplexity and token accuracy still compare models there.

    Exact match is teacher-forced: an example counts as correct when, at every answer position and at the
    end-of-sequence token, the model's most likely next token is the reference one, which is exactly when
    greedy generation would produce the answer's tokens and then stop. One packed forward pass per batch of at most
    `batch_size` examples and `max_batch_tokens` tokens (no padding, use_cache=False so transformers keeps the
    samples apart; the token bound keeps the fp32 logits small: 4,096 tokens x 32,000 = 0.5 GiB, which a T4 holding
    a merged fp16 7B still has). The model is put in eval mode and
    its train/eval mode restored afterwards. (05_training)"""
    for key, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
        check_number(key, value, low=1, integer=True, hint="a whole number >= 1, e.g. 32 examples / 4096 tokens")
    rows = _as_tokenized(dataset, tokenizer, max_length)
    rows = list(rows) if not isinstance(rows, list) else rows
    if not rows:
        raise ValueError("evaluate needs at least one example")
    was_training = model.training
    model.eval()
    device = _device(model)
    total_loss, total_tokens, right_tokens = 0.0, 0, 0
    correct: dict[str, list[bool]] = {}
    try:
        for batch in _batches(rows, batch_size, max_batch_tokens):
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
                hits = pred[mask].argmax(-1) == labels[mask]
                right_tokens += int(hits.sum())
                ok = bool(hits.all())
                correct.setdefault(r.get("kind", "all"), []).append(ok)
                start += n
    finally:
        model.train(was_training)
    mean_loss = total_loss / max(1, total_tokens)
    flat = [c for v in correct.values() for c in v]
    out = {"eval_loss": mean_loss, "perplexity": math.exp(mean_loss),
           "token accuracy": right_tokens / max(1, total_tokens), "accuracy": sum(flat) / len(flat),
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

    use_cache=False by default, which is correct for any model: adapters 1.3.0's Llama layers take the KV cache
    as `past_key_value`, while transformers 4.57 passes `past_key_values`, so after a bare `adapters.init` a
    cached generate() would silently drop the cache and every new token would see only itself
    (adapter-hub/adapters#824). A model prepared by qadapter_utils.methods.add_adapter or load_adapter carries a
    hook that hands the cache over under the old name, so use_cache=True gives the same answers there, faster for
    long answers (notebook 05 shows cached and uncached generation agree). Without the cache each step recomputes
    the whole sequence. A merged model (qadapter_utils.merge.merge_lora) has no adapters layers and generates
    correctly with the cache. (05_training)"""
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
    Llama 2-7B) to `directory` with methods.save_adapter (written beside, then renamed into place) and return it.
    Refuses (guards.SavedWorkError, a FileExistsError; nothing written) when `directory` already holds files,
    unless overwrite=True. Load it back with qadapter_utils.methods.load_adapter. (05_training)"""
    if name not in getattr(model, "adapters_config", ()):
        have = list(getattr(getattr(model, "adapters_config", None), "adapters", {}) or [])
        raise ValueError(f"the model has no adapter {name!r}; it has {have}")
    return save_adapter(model, name, directory, overwrite=overwrite)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The Trainer checkpoints (checkpoint-<step> folders) in `output_dir`, oldest first. (05_training)"""
    folder = Path(output_dir)
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

