"""The tiny model's build script is reproducible: same seed, same weights, bit for bit."""
import hashlib
import subprocess
import sys


def _build(out):
    subprocess.run([sys.executable, "-m", "qadapter_utils.tiny.build", "--steps", "3", "--out", str(out)],
                   check=True, capture_output=True)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_weights(tmp_path):
    assert _build(tmp_path / "a") == _build(tmp_path / "b")


def test_tokenizer_round_trips_and_adds_bos():
    from transformers import AutoTokenizer

    from qadapter_utils.models import TINY_DIR

    tok = AutoTokenizer.from_pretrained(TINY_DIR)
    text = "Ada lives in Oakdale. Zoë's café: 12 + 7 = 19!"  # characters outside the corpus too (byte-level BPE)
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == 512
