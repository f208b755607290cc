"""Instruction data for adapter training: the embedded question-answer task, a prompt template, loss masking,
truncation, padding-free packing and the padding arithmetic that motivates it.

    train, evaluation = world_qa()                       # embedded, generated here, no download
    train_tok = tokenize_dataset(train, tokenizer, max_length=64)
    collator = make_collator(tokenizer, packing=True)   # transformers' DataCollatorWithFlattening

The embedded task asks questions about the tiny model's made-up world (`qadapter_utils.tiny.corpus.world()`):
"Where does Ada live?" -> "Ada lives in Ashford.", "What does Ben work as?" -> "Ben is a farmer.", ... The tiny
model was pretrained only on sentences stating these facts, never on questions and answers, so before training
it cannot answer (0% exact match, measured); an adapter has to teach it the format and to let it say what it
already knows. The evaluation split holds out one fact of every person: no evaluation answer is ever a training
target, so accuracy measures the learned skill, not memorised pairs (see world_qa for the other choices).
With Llama 2 the same code takes a hub dataset in the "### Human: ... ### Assistant: ..." format of
`timdettmers/openassistant-guanaco` (`load_instruction_data`), downloaded only when asked for.

Packing uses transformers' own `DataCollatorWithFlattening`: the samples of a batch are concatenated into one row
without padding, with `position_ids` restarting at 0 for each sample and no `attention_mask`; transformers 4.57
then builds a block-diagonal causal mask from the position ids (`masking_utils.find_packed_sequence_indices`, for
the eager and SDPA attention used on the CPU, and varlen kernels with flash-attention-2), so samples do not see each
other (tests/test_data.py checks the logits). Two things switch that off silently: an `attention_mask` passed
with a packed row, and a KV cache (Llama makes one whenever use_cache is on, also during training without
gradient checkpointing) -- so make_collator's packed batches carry use_cache=False.

Introduced in notebooks/05_training.ipynb. Needs tiny/corpus.py only for the embedded task
(world_qa, load_instruction_data('world')); copied, corpus.py sits next to data.py.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: The prompt template of the embedded task: short, because every prompt token costs compute (the tiny tokenizer
#: spells unknown words letter by letter). Hub datasets keep their own format (see split_conversation).
PROMPT_TEMPLATE = "Q: {question}\nA:"
ASSISTANT_TAG = "### Assistant:"
IGNORE_INDEX = -100  # label value the loss ignores (PyTorch's cross_entropy default)

# Question phrasings per kind; {n} is the person's name. Every phrasing appears in training and evaluation:
# what is held out are facts (or people, or number pairs; see world_qa).
QUESTIONS: dict[str, tuple[str, ...]] = {
    "town": ("Where does {n} live?", "In which town does {n} live?", "What town is {n} from?"),
    "job": ("What does {n} work as?", "What is the job of {n}?", "What is {n}'s job?"),
    "pet": ("What pet does {n} have?", "Which animal does {n} have?", "What animal is {n}'s pet?"),
    "food": ("What does {n} like to eat?", "What food does {n} like?", "What does {n} eat every day?"),
    "plus": ("What is {a} plus {b}?", "How much is {a} plus {b}?"),
    "minus": ("What is {a} minus {b}?", "How much is {a} minus {b}?"),
}
FACT_KINDS = ("town", "job", "pet", "food")
ARITHMETIC_KINDS = ("plus", "minus")


def _corpus():
    """tiny/corpus.py, needed only by the embedded task: inside the package, or copied next to data.py."""
    try:
        from .tiny import corpus
    except ImportError:  # copied next to corpus.py (the copy-alone rule: qadapter_utils/__init__.py)
        import corpus
    return corpus


def format_prompt(question: str) -> str:
    """The prompt the model sees for `question` (PROMPT_TEMPLATE filled in). (05_training)"""
    return PROMPT_TEMPLATE.format(question=question.strip())


def _fact_examples(people, kinds, style) -> list[dict]:
    out = []
    for p in people:
        words = {"town": p.town, "job": p.job, "pet": p.pet, "food": p.food}
        sentences = {"town": f"{p.name} lives in {p.town}.", "job": f"{p.name} is a {p.job}.",
                     "pet": f"{p.name} has a {p.pet_color} {p.pet}.", "food": f"{p.name} likes {p.food}."}
        for kind in kinds:
            answer = words[kind] if style == "word" else sentences[kind]
            for phrasing in QUESTIONS[kind]:
                out.append({"prompt": format_prompt(phrasing.format(n=p.name)), "answer": answer,
                            "kind": kind, "subject": p.name})
    return out


def _arithmetic_examples(pairs, kinds, style) -> list[dict]:
    out = []
    for a, b in pairs:
        for kind in kinds:
            if kind == "minus" and a < b:
                continue
            value = a + b if kind == "plus" else a - b
            wa, wb, wv = (_corpus().NUMBER_WORDS[k] for k in (a, b, value))
            answer = wv if style == "word" else f"{wa.capitalize()} {kind} {wb} is {wv}."
            for phrasing in QUESTIONS[kind]:
                out.append({"prompt": format_prompt(phrasing.format(a=wa, b=wb)), "answer": answer, "kind": kind,
                            "subject": f"{a},{b}"})
    return out


def world_qa(kinds: Sequence[str] = FACT_KINDS, holdout: str = "facts", style: str = "sentence",
             n_eval_people: int = 10, eval_fraction_pairs: float = 0.2, seed: int = 0, as_dataset: bool = True):
    """The embedded question-answer task as (train, eval): `datasets.Dataset`s (or lists of dicts with
    as_dataset=False) with columns prompt, answer, kind, subject.

    style="sentence" answers in the sentence pretraining used ("Ada lives in Ashford."); style="word" with the
    bare word ("Ashford"). holdout decides what eval holds that training never showed:
    "facts" (default): every person appears in training, but one fact of each person (town for one, job for the
    next, ...) is asked only in eval. So no eval answer was ever a training target: the adapter must learn the
    skill (the question format, and to let the base model fill in what it knows) rather than memorise pairs.
    "people": `n_eval_people` people appear only in eval (harder: the model must also handle names it never saw in
    a question; the tiny model cannot, which notebook 05's exercises explore).
    Arithmetic kinds ("plus", "minus"; not in the default) hold out a fraction of the number pairs.
    Every phrasing of QUESTIONS appears in both splits. (05_training)"""
    if style not in ("sentence", "word"):
        raise ValueError(f"style={style!r}: use 'sentence' (answer in a full sentence) or 'word' (the bare word)")
    if holdout not in ("facts", "people"):
        raise ValueError(f"holdout={holdout!r}: use 'facts' (one fact per person held out) or 'people'")
    unknown = sorted(set(kinds) - set(QUESTIONS))
    if unknown or not kinds:
        raise ValueError(f"unknown question kinds {unknown or list(kinds)}: choose from {list(QUESTIONS)}")
    people = _corpus().world()
    rng = random.Random(seed)
    order = list(range(len(people)))
    rng.shuffle(order)
    fact_kinds = [k for k in kinds if k in FACT_KINDS]
    arith_kinds = [k for k in kinds if k in ARITHMETIC_KINDS]
    train, evaluation = [], []
    if holdout == "people":
        if not 0 < n_eval_people < len(people):
            raise ValueError(f"n_eval_people={n_eval_people}: choose between 1 and {len(people) - 1}")
        evaluation += _fact_examples([people[i] for i in sorted(order[:n_eval_people])], fact_kinds, style)
        train += _fact_examples([people[i] for i in sorted(order[n_eval_people:])], fact_kinds, style)
    elif fact_kinds:
        if len(fact_kinds) == 1:
            raise ValueError("holdout='facts' needs at least two fact kinds (one is held out per person); "
                             "use holdout='people' for a single kind")
        held = {order[j]: fact_kinds[j % len(fact_kinds)] for j in range(len(people))}
        for i, person in enumerate(people):
            evaluation += _fact_examples([person], [held[i]], style)
            train += _fact_examples([person], [k for k in fact_kinds if k != held[i]], style)
    pairs = [(a, b) for a in range(11) for b in range(11)]
    rng.shuffle(pairs)
    n_eval_pairs = max(1, round(eval_fraction_pairs * len(pairs)))
    evaluation += _arithmetic_examples(sorted(pairs[:n_eval_pairs]), arith_kinds, style)
    train += _arithmetic_examples(sorted(pairs[n_eval_pairs:]), arith_kinds, style)
    random.Random(seed + 1).shuffle(train)
    if not as_dataset:
        return train, evaluation
    from datasets import Dataset

    return Dataset.from_list(train), Dataset.from_list(evaluation)


def split_conversation(text: str) -> dict | None:
    """Split one guanaco-style record "### Human: ... ### Assistant: ..." (possibly several turns) into
    {"prompt": everything up to and including the last "### Assistant:", "answer": the last reply}; None when the
    text has no assistant turn. Only the last reply is trained on. (05_training)"""
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0:
        return None
    prompt, answer = text[:cut + len(ASSISTANT_TAG)], text[cut + len(ASSISTANT_TAG):].strip()
    if not answer or not prompt.strip().startswith("### Human:"):
        return None
    return {"prompt": prompt.strip(), "answer": answer, "kind": "chat", "subject": ""}


def load_instruction_data(name: str = "world", max_examples: int | None = None, seed: int = 0):
    """(train, eval) as `datasets.Dataset`s with columns prompt, answer, kind, subject.

    name="world": the embedded task (world_qa), no download. Any other name is a hub dataset with a "text"
    column in the guanaco format (e.g. "timdettmers/openassistant-guanaco", which has train and test splits);
    it is downloaded through `datasets.load_dataset` only here, so code that never asks for it never touches the
    network. max_examples keeps the first N of each split. (05_training)"""
    if name == "world":
        train, evaluation = world_qa(seed=seed)
    else:
        from datasets import load_dataset

        try:
            raw = load_dataset(name)
        except Exception as err:  # offline, unknown name, ...
            raise ValueError(f"could not load the hub dataset {name!r} ({type(err).__name__}: {err}). Check the "
                             f"name and the network, or use name='world' (embedded, no download).") from err
        if "text" not in raw["train"].column_names:
            raise ValueError(f"{name!r} has no 'text' column (columns: {raw['train'].column_names}): "
                             f"load_instruction_data expects guanaco-style '### Human: ... ### Assistant: ...' "
                             f"text; convert your dataset to prompt/answer columns yourself instead")
        eval_split = "test" if "test" in raw else None
        splits = {"train": raw["train"], "eval": raw[eval_split] if eval_split else None}
        if splits["eval"] is None:
            parts = raw["train"].train_test_split(test_size=0.05, seed=seed)
            splits = {"train": parts["train"], "eval": parts["test"]}
        from datasets import Dataset

        out = []
        for key in ("train", "eval"):
            rows = [r for r in map(split_conversation, splits[key]["text"]) if r is not None]
            out.append(Dataset.from_list(rows))
        train, evaluation = out
    if max_examples is not None:
        train = train.select(range(min(max_examples, len(train))))
        evaluation = evaluation.select(range(min(max_examples, len(evaluation))))
    return train, evaluation


# ---------------------------------------------------------------------------------------------------------------
# tokenization with the prompt masked out of the loss


def tokenize_example(tokenizer, prompt: str, answer: str, max_length: int | None = None) -> dict | None:
    """Token ids of `prompt + " " + answer + eos` with labels: IGNORE_INDEX (-100) on the prompt tokens (the
    loss trains only the answer and the end-of-sequence token) and the token ids on the answer.

    The text is tokenized in one piece (as the model will read it) and a token counts as answer when it starts at
    or after the end of the prompt (character offsets from the fast tokenizer), so tokenizers that merge across
    the boundary or add a leading space (Llama 2's SentencePiece) are handled. Truncation keeps the first
    `max_length` tokens; returns None when no answer token is left (such an example would train nothing).
    Returns {"input_ids", "labels", "length", "truncated"}. (05_training)"""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_example needs a fast tokenizer (character offsets): load it with "
                         "AutoTokenizer.from_pretrained(..., use_fast=True)")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: set tokenizer.eos_token so the model learns to stop")
    text = prompt + " " + answer.strip()
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"]) + [tokenizer.eos_token_id]
    special = set(tokenizer.all_special_ids)
    labels = []
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        is_answer = start >= len(prompt) and end > start and token_id not in special
        labels.append(token_id if is_answer else IGNORE_INDEX)
    labels.append(tokenizer.eos_token_id)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels, "length": len(ids), "truncated": truncated}


@dataclass
class TokenizeStats:
    """What tokenize_dataset did: examples in, kept, truncated (cut to max_length) and dropped (no answer token
    left after truncation), and the token lengths of the kept examples."""
    examples: int
    kept: int
    truncated: int
    dropped: int
    max_length: int | None
    mean_tokens: float
    longest: int

    def __str__(self) -> str:
        return (f"{self.kept} of {self.examples} examples kept ({self.truncated} truncated to {self.max_length} "
                f"tokens, {self.dropped} dropped: no answer token left); {self.mean_tokens:.1f} tokens on "
                f"average, longest {self.longest}")


def tokenize_dataset(dataset, tokenizer, max_length: int | None = 256, verbose: bool = False,
                     return_stats: bool = False):
    """Tokenize a dataset (or list) of prompt/answer rows with tokenize_example; return a `datasets.Dataset`
    with columns input_ids, labels, length plus the original ones (prompt, answer, kind, ...), or
    (dataset, TokenizeStats) with return_stats=True. verbose=True prints the statistics. (05_training)"""
    from datasets import Dataset

    rows = list(dataset) if not isinstance(dataset, list) else dataset
    if rows and not {"prompt", "answer"} <= set(rows[0]):
        raise ValueError(f"rows need 'prompt' and 'answer' fields, got {sorted(rows[0])}: build them with "
                         f"world_qa(), load_instruction_data() or split_conversation()")
    out, truncated, dropped = [], 0, 0
    for row in rows:
        tok = tokenize_example(tokenizer, row["prompt"], row["answer"], max_length)
        if tok is None:
            dropped += 1
            continue
        truncated += tok.pop("truncated")
        out.append({**row, **tok})
    lengths = [r["length"] for r in out]
    stats = TokenizeStats(len(rows), len(out), truncated, dropped, max_length,
                          sum(lengths) / max(1, len(lengths)), max(lengths, default=0))
    if verbose:
        print(stats)
    result = Dataset.from_list(out)
    return (result, stats) if return_stats else result


# ---------------------------------------------------------------------------------------------------------------
# batching: padding versus padding-free packing

MODEL_KEYS = ("input_ids", "labels")


class _SelectKeys:
    """Wrap a collator so that it sees only the model's keys (datasets rows also carry text columns), and add
    fixed keyword arguments (`extra`) to every batch."""

    def __init__(self, collator, keys: Iterable[str] = MODEL_KEYS, extra: dict | None = None):
        self.collator, self.keys, self.extra = collator, tuple(keys), dict(extra or {})

    def __call__(self, features):
        batch = self.collator([{k: f[k] for k in self.keys} for f in features])
        batch.update(self.extra)
        return batch

    def __repr__(self) -> str:
        return f"{type(self.collator).__name__}(keys={self.keys})"


def make_collator(tokenizer, packing: bool = True, pad_to_multiple_of: int | None = None):
    """The data collator for (input_ids, labels) rows. packing=True: transformers' DataCollatorWithFlattening
    (one row per batch, position_ids restarting per sample, no attention_mask, no padding; the first label of each
    sample set to -100 so no sample is trained to predict the next one's first token), plus use_cache=False in
    every batch: transformers 4.57 derives the per-sample mask from position_ids only when no KV cache is
    passed, and Llama creates one whenever use_cache is on (config.use_cache=True, the default, unless gradient
    checkpointing turns it off) -- without it, packed samples would attend to each other. packing=False:
    DataCollatorForSeq2Seq (right padding with the pad token, labels padded with -100, attention_mask).
    Extra columns (prompt, kind, ...) are dropped. (05_training)"""
    if packing:
        from transformers import DataCollatorWithFlattening

        return _SelectKeys(DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX),
                           extra={"use_cache": False})
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        raise ValueError("padding needs tokenizer.pad_token: set it (Llama 2: tokenizer.pad_token = "
                         "tokenizer.unk_token) or use packing=True, which needs no padding")
    return _SelectKeys(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                              pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt"))


def token_batches(lengths: Sequence[int], max_tokens: int, seed: int = 0) -> list[list[int]]:
    """Index batches of at most `max_tokens` tokens for packing: the samples in a random order (`seed`), each batch
    filled greedily until the next sample would not fit. A sample longer than max_tokens raises ValueError.
    (make_trainer(tokens_per_step=...) batches this way; 05_training)"""
    import torch

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r}: tokens per batch, an integer >= 1")
    longest = max(lengths, default=0)
    if longest > max_tokens:
        raise ValueError(f"a sample of {longest} tokens does not fit in {max_tokens} tokens per batch: pass at "
                         f"least {longest} (the longest sample) or cut the samples")
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    batches, current, used = [], [], 0
    for i in order:
        if used + lengths[i] > max_tokens and current:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


class TokenBatchSampler:
    """A batch sampler (DataLoader(batch_sampler=...)) of token_batches(lengths, max_tokens, seed): the batches
    are formed once; each epoch (set_epoch) visits them in another order. (05_training)"""

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0):
        self.batches, self.seed, self.epoch = token_batches(lengths, max_tokens, seed), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.batches)))
        rng.shuffle(order)
        return iter([self.batches[i] for i in order])


def padding_fraction(lengths: Sequence[int], batch_size: int, strategy: str = "random", seed: int = 0) -> float:
    """Fraction of the token slots that are padding when `lengths` are batched `batch_size` at a time and each
    batch is padded to its longest sample. strategy: "random" (a shuffled order, the Trainer's default sampler),
    "grouped" (the Trainer's group_by_length: transformers' LengthGroupedSampler), or "packed"
    (DataCollatorWithFlattening: always 0.0). (05_training)"""
    lengths = list(map(int, lengths))
    if batch_size < 1 or not lengths:
        raise ValueError("need batch_size >= 1 and at least one length")
    if strategy == "packed":
        return 0.0
    import torch

    generator = torch.Generator().manual_seed(seed)
    if strategy == "random":
        order = torch.randperm(len(lengths), generator=generator).tolist()
    elif strategy == "grouped":
        from transformers.trainer_pt_utils import LengthGroupedSampler

        order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=generator))
    else:
        raise ValueError(f"strategy={strategy!r}: use 'random', 'grouped' or 'packed'")
    slots = real = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i:i + batch_size]]
        slots += max(batch) * len(batch)
        real += sum(batch)
    return 1.0 - real / slots


def padding_report(lengths: Sequence[int], batch_size: int, seed: int = 0):
    """A pandas DataFrame: padding fraction and token slots per step for random batches, length-grouped batches
    and packing. (05_training)"""
    import pandas as pd

    rows = []
    for strategy in ("random", "grouped", "packed"):
        frac = padding_fraction(lengths, batch_size, strategy, seed)
        rows.append({"batching": strategy, "padding %": 100.0 * frac,
                     "token slots per real token": 1.0 / (1.0 - frac)})
    return pd.DataFrame(rows).set_index("batching")
