"""Test-session settings: the tiny models' matrices are small, so one thread is faster than several (thread
start-up dominates), and results do not depend on how many cores the machine has."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
