"""Regenerate the embedded tiny Llama 2: train its tokenizer and pretrain it on the embedded corpus.

    python -m qadapter_utils.tiny.build            # writes qadapter_utils/tiny/model/ (a few minutes on 2 cores)
    python -m qadapter_utils.tiny.build --steps 20 --out /tmp/tiny   # a quick run, e.g. to check reproducibility

Same seed and same thread count -> the same weights, bit for bit (deterministic algorithms, fixed data order).
The model is a real `LlamaForCausalLM` (RMSNorm, SwiGLU MLP, rotary position embeddings), only small.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

try:  # inside the qadapter_utils package
    from ..models import SHAPES
    from .corpus import corpus
except ImportError:  # copied next to its siblings (the copy-alone rule: qadapter_utils/__init__.py)
    from corpus import corpus
    from models import SHAPES

MODEL_DIR = Path(__file__).parent / "model"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # as in Llama 2: no padding token of its own
TINY_CONFIG = dict(SHAPES["tiny"][1])  # the shape lives in models.SHAPES (also the estimator's "tiny")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no unknown tokens possible) that adds <s> in front, like Llama 2's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=TINY_CONFIG["max_position_embeddings"], padding_side="right",
                                   model_input_names=["input_ids", "attention_mask"])


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All paragraphs as one stream: <s> paragraph </s> <s> paragraph </s> ..."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return torch.tensor([t for seq in ids for t in (*seq, tokenizer.eos_token_id)], dtype=torch.long)


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int = 128, batch_size: int = 32) -> float:
    """exp(mean next-token loss) over non-overlapping windows of the stream."""
    model.eval()
    n = (len(stream) - 1) // seq_len
    windows = stream[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = windows[i:i + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        total += loss.item() * batch.numel()
        count += batch.numel()
    return math.exp(total / count)


def build(out: Path, steps: int, seed: int, threads: int, seq_len: int = 128, batch_size: int = 32,
          lr: float = 3e-3) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    train_texts, valid_texts = corpus("train"), corpus("validation")
    tokenizer = train_tokenizer(train_texts, TINY_CONFIG["vocab_size"])
    train_stream, valid_stream = token_stream(tokenizer, train_texts), token_stream(tokenizer, valid_texts)

    config = LlamaConfig(**TINY_CONFIG)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    n_windows = (len(train_stream) - 1) // seq_len
    t0 = time.time()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(train_stream) - seq_len, (batch_size,), generator=gen)
        batch = torch.stack([train_stream[s:s + seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - t0:6.1f}s", flush=True)
    seconds = time.time() - t0
    ppl = perplexity(model, valid_stream)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    stats = {
        "seed": seed, "threads": threads, "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
        "train_tokens_seen": steps * batch_size * seq_len, "train_stream_tokens": len(train_stream),
        "train_windows": n_windows, "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1), "validation_perplexity": round(ppl, 3),
        "uniform_perplexity": config.vocab_size,
    }
    (out / "build_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads; part of what fixes the weights")
    args = parser.parse_args()
    build(args.out, args.steps, args.seed, args.threads)


if __name__ == "__main__":
    main()
