"""qadapter_utils.merge.save_merged: the merged checkpoint written a tensor at a time loads as a plain model whose
weights are exactly merge_lora's (sharded or not), and it never writes over saved work."""
import json

import pytest
import torch

from qadapter_utils.merge import merge_lora, save_merged
from qadapter_utils.methods import add_adapter
from qadapter_utils.models import load_model


@pytest.fixture(scope="module")
def adapter_model():
    model, tokenizer = load_model("tiny", bits=4)
    name = add_adapter(model, "lora_all")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: give it weights so that the merge changes something
        for _path, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return model, tokenizer, name


@pytest.mark.parametrize("max_shard_bytes", [2**30, 300_000])
def test_saved_merged_model_equals_merge_lora(adapter_model, tmp_path, max_shard_bytes):
    model, tokenizer, name = adapter_model
    folder = save_merged(model, name, tmp_path / "merged", tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in folder.iterdir())
    if max_shard_bytes == 2**30:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    else:  # several shards and the index from_pretrained reads
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards == sorted(f for f in files if f.startswith("model-"))
    assert {"config.json", "tokenizer.json"} <= set(files)
    reference = merge_lora(model, name)
    loaded, loaded_tokenizer = load_model(str(folder))
    assert not hasattr(loaded, "adapters_config") and getattr(loaded.config, "quantization_config", None) is None
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    expected = reference.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert any(not torch.equal(loaded.state_dict()[k], v) for k, v in load_model("tiny")[0].state_dict().items())


def test_save_merged_refuses_a_folder_with_files(adapter_model, tmp_path):
    model, _, name = adapter_model
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="nothing was written"):
        save_merged(model, name, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_merge_cut_short_leaves_no_half_checkpoint(adapter_model, tmp_path, monkeypatch):
    import safetensors.torch

    model, _, name = adapter_model
    calls = []
    real = safetensors.torch.save_file

    def failing_save_file(*args, **kwargs):  # the disk fills up, or the process is interrupted, at shard 2
        calls.append(1)
        if len(calls) == 2:
            raise OSError("no space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="no space"):
        save_merged(model, name, tmp_path / "merged", max_shard_bytes=300_000)
    assert list(tmp_path.iterdir()) == [], "neither the target nor a temporary folder is left behind"
