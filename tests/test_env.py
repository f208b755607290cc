import warnings

import torch

from qadapter_utils import env


def test_report_lists_stack_device_and_backend(capsys):
    info = env.report()
    printed = capsys.readouterr().out
    for key in ("torch", "transformers", "adapters", "bitsandbytes", "device", "bitsandbytes backend"):
        assert key in info and key in printed
    assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_version_mismatch_warns(monkeypatch):
    monkeypatch.setitem(env.PINNED, "transformers", "0.0.1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env.report()
    messages = [str(w.message) for w in caught]
    assert any("transformers" in m and "0.0.1" in m and "pip install transformers==0.0.1" in m for m in messages)


def test_compute_dtype_choice(monkeypatch):
    assert env.default_compute_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert env.default_compute_dtype("cuda") == torch.float16  # a T4: no bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert env.default_compute_dtype("cuda") == torch.bfloat16
