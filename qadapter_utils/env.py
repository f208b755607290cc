"""The environment: which versions, which device, which compute dtype.

Introduced in notebooks/00_setup.ipynb. Imports nothing heavy at module import time; works when copied alone.
"""
from __future__ import annotations

import importlib.metadata
import platform
import warnings

# The stack the notebooks are executed against in CI (pyproject.toml and environment.yml carry the same pins;
# tests/test_packaging.py checks that they agree). torch is open in pyproject so Colab keeps its CUDA build.
PINNED: dict[str, str] = {
    "torch": "2.13.0",
    "transformers": "4.57.6",
    "adapters": "1.3.0",
    "bitsandbytes": "0.50.2",
    "accelerate": "1.15.0",
    "datasets": "5.0.1",
    "tokenizers": "0.22.2",
}
OTHER_PACKAGES = ("safetensors", "matplotlib", "pandas", "ipywidgets", "nbval", "peft")


def installed_version(package: str) -> str | None:
    """The installed version of `package`, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device() -> str:
    """'cuda' when a CUDA GPU is usable, else 'cpu'. (00_setup)"""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_compute_dtype(device_name: str | None = None):
    """The dtype matrix multiplications should run in: bf16 on GPUs that support it, fp16 on GPUs without
    bf16 (Colab's T4, compute capability 7.5), fp32 on the CPU. (00_setup)"""
    import torch

    device_name = device_name or device()
    if device_name == "cpu":
        return torch.float32
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16


def bitsandbytes_backend() -> str:
    """Which bitsandbytes kernels run here: 'cuda', 'cpu' (the multi-backend CPU kernels) or 'missing'."""
    if installed_version("bitsandbytes") is None:
        return "missing"
    import bitsandbytes  # noqa: F401  (registers its kernels)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def version_warnings() -> list[str]:
    """One line for each pinned package whose installed version differs from the pin."""
    out = []
    for package, pinned in PINNED.items():
        found = installed_version(package)
        if found is None:
            out.append(f"{package} is not installed (pinned: {pinned}); run `make test` or "
                       f"`pip install {package}=={pinned}`")
        elif found.split("+")[0] != pinned:
            out.append(f"{package} {found} differs from the tested {pinned}: the notebooks are executed against "
                       f"{pinned}; if something breaks, `pip install {package}=={pinned}`")
    return out


def report(warn: bool = True) -> dict[str, str]:
    """Print and return the versions of the stack, the device and the bitsandbytes backend, warning when a
    version differs from the pinned one. (00_setup; every notebook's environment cell)"""
    import torch

    info: dict[str, str] = {"python": platform.python_version()}
    for package in (*PINNED, *OTHER_PACKAGES):
        info[package] = installed_version(package) or "not installed"
    dev = device()
    info["device"] = dev
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor})"
    else:
        info["cpu threads"] = str(torch.get_num_threads())
    info["bitsandbytes backend"] = bitsandbytes_backend()
    info["compute dtype"] = str(default_compute_dtype(dev)).replace("torch.", "")
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    if warn:
        for line in version_warnings():
            warnings.warn(line, stacklevel=2)
    return info
