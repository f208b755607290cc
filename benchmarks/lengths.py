"""The sequence-length mix of the GPU benchmarks (benchmarks/recipe_vs_peft.py), and random token rows of it.

Instruction data is a mix of short and long samples, and that mix decides how much a padded batch wastes, so the
speed benchmarks train on a fixed, documented mix instead of one length. It stands for
`timdettmers/openassistant-guanaco` (9,846 "### Human: ... ### Assistant: ..." conversations, the QLoRA paper's
dataset) tokenized with the Llama 2 tokenizer and truncated at 1,024 tokens:

    log-normal lengths: median 256 tokens, sigma 0.75 (log space), clipped to [16, 1024]; 192 sequences, seed 0

The parameters reproduce the summary of that dataset stated in issue 8 of this project (median 256 tokens,
16-1,024, 192 sequences holding about 63k real tokens, i.e. a mean of about 330). They were NOT refitted to the
dataset on this machine (it has no network); `fit_lognormal` refits them from real lengths, e.g.

    from datasets import load_dataset; from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained("NousResearch/Llama-2-7b-hf")
    texts = load_dataset("timdettmers/openassistant-guanaco", split="train")["text"]
    print(fit_lognormal([min(len(tok(t).input_ids) + 1, 1024) for t in texts]))

and `python benchmarks/lengths.py` prints the statistics of the mix used. Token ids are random (the models have
random weights too): values change neither memory nor speed. Standard library only (random.Random is
deterministic across platforms), so the GPU machine needs nothing else.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

MEDIAN = 256
SIGMA = 0.75
MIN_LEN = 16
MAX_LEN = 1024
N_SEQUENCES = 192
SEED = 0


def sample_lengths(n: int = N_SEQUENCES, median: float = MEDIAN, sigma: float = SIGMA, lo: int = MIN_LEN,
                   hi: int = MAX_LEN, seed: int = SEED) -> list[int]:
    """`n` token lengths drawn log-normally (median `median`, log-space standard deviation `sigma`), rounded and
    clipped to [lo, hi]."""
    if n < 1 or not 1 <= lo <= hi:
        raise ValueError(f"need n >= 1 and 1 <= lo <= hi, got n={n}, lo={lo}, hi={hi}")
    rng = random.Random(seed)
    mu = math.log(median)
    return [min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def token_rows(lengths: Sequence[int], vocab_size: int, seed: int = SEED, bos_id: int = 1,
               first_id: int = 3) -> list[list[int]]:
    """One row of random token ids per length: the beginning-of-sequence id first, then ids drawn uniformly
    from [first_id, vocab_size) (no special tokens inside)."""
    if vocab_size <= first_id:
        raise ValueError(f"vocab_size={vocab_size} leaves no ordinary token above id {first_id}")
    rng = random.Random(seed + 1)
    return [[bos_id] + [rng.randrange(first_id, vocab_size) for _ in range(n - 1)] for n in lengths]


def describe(lengths: Sequence[int]) -> dict:
    """Count, total, mean, median, 10th/90th percentile, min and max of `lengths`."""
    ordered = sorted(lengths)
    n = len(ordered)
    return {"sequences": n, "tokens": sum(ordered), "mean": round(sum(ordered) / n, 1),
            "median": statistics.median(ordered), "p10": ordered[int(0.1 * (n - 1))],
            "p90": ordered[int(0.9 * (n - 1))], "min": ordered[0], "max": ordered[-1]}


def fit_lognormal(lengths: Sequence[int]) -> dict:
    """{"median", "sigma"} of the log-normal that fits `lengths` (mean and standard deviation of log length)."""
    logs = [math.log(x) for x in lengths if x > 0]
    if len(logs) < 2:
        raise ValueError("need at least two positive lengths to fit")
    return {"median": round(math.exp(statistics.fmean(logs)), 1), "sigma": round(statistics.stdev(logs), 3)}


def batches_padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Fraction of token slots that are padding when each batch (a list of indices into `lengths`) is padded
    to its longest sample."""
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / slots


if __name__ == "__main__":
    mix = sample_lengths()
    print(describe(mix), fit_lognormal(mix))
