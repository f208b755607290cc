"""qadapter_utils.data: the embedded task and its split, prompt masking, truncation, packing (no token lost, no
attention between packed samples) and the padding arithmetic."""
import pytest
import torch

from qadapter_utils.data import (
    FACT_KINDS,
    IGNORE_INDEX,
    format_prompt,
    make_collator,
    padding_fraction,
    split_conversation,
    tokenize_dataset,
    tokenize_example,
    world_qa,
)
from qadapter_utils.models import load_model
from qadapter_utils.tiny.corpus import world


@pytest.fixture(scope="module")
def tiny4():
    torch.manual_seed(0)
    model, tok = load_model("tiny", bits=4)
    return model, tok


@pytest.fixture(scope="module")
def rows(tiny4):
    _, tok = tiny4
    train, _ = world_qa(as_dataset=False)
    return [tokenize_example(tok, r["prompt"], r["answer"]) for r in train[:5]]


def test_world_qa_holds_out_one_fact_per_person():
    train, evaluation = world_qa(as_dataset=False)
    again, _ = world_qa(as_dataset=False)
    assert train == again  # deterministic
    facts = lambda rows: {(r["subject"], r["kind"]) for r in rows}  # noqa: E731
    assert not facts(train) & facts(evaluation)              # no eval fact is ever a training target
    assert {r["answer"] for r in evaluation}.isdisjoint({r["answer"] for r in train})
    names = {p.name for p in world()}
    assert {r["subject"] for r in evaluation} == {r["subject"] for r in train} == names  # everyone in both
    assert len(facts(evaluation)) == len(names) and len(facts(train)) == 3 * len(names)
    assert {r["kind"] for r in evaluation} == set(FACT_KINDS)
    phrasings = lambda rows: {r["prompt"].replace(r["subject"], "X") for r in rows}  # noqa: E731
    assert phrasings(train) == phrasings(evaluation)       # every phrasing appears in both splits
    people = {p.name: p for p in world()}
    for r in evaluation:
        p = people[r["subject"]]
        assert r["answer"] == {"town": f"{p.name} lives in {p.town}.", "job": f"{p.name} is a {p.job}.",
                               "pet": f"{p.name} has a {p.pet_color} {p.pet}.",
                               "food": f"{p.name} likes {p.food}."}[r["kind"]]


def test_world_qa_other_splits_and_errors():
    train, evaluation = world_qa(holdout="people", style="word", as_dataset=False)
    assert not {r["subject"] for r in train} & {r["subject"] for r in evaluation}
    assert len({r["subject"] for r in evaluation}) == 10
    assert all(" " not in r["answer"] for r in evaluation)
    train, evaluation = world_qa(kinds=("plus",), holdout="people", as_dataset=False)
    assert not {r["subject"] for r in train} & {r["subject"] for r in evaluation}
    assert {r["kind"] for r in evaluation} == {"plus"}
    for bad in (dict(kinds=("weather",)), dict(holdout="phrasings"), dict(style="poem"),
                dict(kinds=("town",))):
        with pytest.raises(ValueError):
            world_qa(**bad)


def test_prompt_tokens_are_masked(tiny4):
    _, tok = tiny4
    prompt, answer = format_prompt("Where does Ada live?"), "Ada lives in Ashford."
    out = tokenize_example(tok, prompt, answer)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels) == out["length"]
    assert ids[0] == tok.bos_token_id and ids[-1] == labels[-1] == tok.eos_token_id
    n_prompt = len(tok(prompt).input_ids)
    assert ids[:n_prompt] == tok(prompt).input_ids        # the prompt tokenizes the same inside the text
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # and is not trained
    assert labels[n_prompt:] == ids[n_prompt:]             # the answer (and eos) is
    assert tok.decode(ids[n_prompt:-1]).strip() == answer


def test_truncation_keeps_the_start_and_drops_empty_examples(tiny4):
    _, tok = tiny4
    prompt, answer = format_prompt("What is three plus four?"), "Three plus four is seven."
    full = tokenize_example(tok, prompt, answer)
    n_prompt = len(tok(prompt).input_ids)
    cut = tokenize_example(tok, prompt, answer, max_length=n_prompt + 2)
    assert cut["truncated"] and cut["input_ids"] == full["input_ids"][:n_prompt + 2]
    assert tokenize_example(tok, prompt, answer, max_length=n_prompt) is None  # no answer token left
    data, stats = tokenize_dataset([{"prompt": prompt, "answer": answer}] * 3, tok, max_length=n_prompt,
                                   return_stats=True)
    assert len(data) == 0 and stats.dropped == 3


def test_packing_loses_no_token(tiny4, rows):
    _, tok = tiny4
    batch = make_collator(tok, packing=True)([{**r, "kind": "x"} for r in rows])
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert batch["input_ids"][0].tolist() == [t for r in rows for t in r["input_ids"]]
    assert batch["position_ids"][0].tolist() == [p for r in rows for p in range(len(r["input_ids"]))]
    # the first label of each sample becomes -100 (it was already: <s> is prompt), every answer label survives
    assert batch["labels"][0].tolist() == [IGNORE_INDEX if i == 0 else t for r in rows
                                           for i, t in enumerate(r["labels"])]


def _packed_vs_alone(model, tok, rows, **extra):
    batch = make_collator(tok, packing=True)(rows)
    batch.update(extra)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0]
                           for r in rows])
    return (packed - alone).abs().max().item()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_samples_do_not_attend_to_each_other(tiny4, rows, attention):
    model, tok = tiny4
    model.set_attn_implementation(attention)
    try:
        assert _packed_vs_alone(model, tok, rows) < 1e-4
        # the test can fail: a KV cache or an all-ones attention mask switches transformers' packed-sequence
        # detection off, and every sample then attends to the ones before it
        assert _packed_vs_alone(model, tok, rows, use_cache=True) > 0.1
        ones = torch.ones(1, sum(len(r["input_ids"]) for r in rows), dtype=torch.long)
        assert _packed_vs_alone(model, tok, rows, attention_mask=ones) > 0.1
    finally:
        model.set_attn_implementation("sdpa")


def test_packed_loss_equals_padded_loss(tiny4, rows):
    model, tok = tiny4
    packed = make_collator(tok, packing=True)(rows)
    padded = make_collator(tok, packing=False)(rows)
    assert padded["input_ids"].shape[0] == len(rows) and (padded["labels"] == IGNORE_INDEX).any()
    with torch.no_grad():
        loss_packed = model(**packed).loss
        loss_padded = model(**padded).loss
    assert torch.allclose(loss_packed, loss_padded, atol=1e-5)


def test_padding_fraction():
    lengths = [10, 20, 10, 20]
    assert padding_fraction(lengths, 4) == pytest.approx(1 - 60 / 80)
    assert padding_fraction(lengths, 1) == 0.0
    assert padding_fraction(lengths, 2, "packed") == 0.0
    many = [5 + (i * 37) % 40 for i in range(400)]
    assert padding_fraction(many, 16, "grouped") < padding_fraction(many, 16, "random")
    with pytest.raises(ValueError, match="strategy"):
        padding_fraction(many, 16, "sorted")


def test_split_conversation_guanaco_format():
    text = "### Human: Hi there ### Assistant: Hello! ### Human: What is 2+2? ### Assistant: It is 4."
    row = split_conversation(text)
    assert row["prompt"].endswith("What is 2+2? ### Assistant:") and row["answer"] == "It is 4."
    assert split_conversation("### Human: no answer here") is None
