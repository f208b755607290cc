"""Blockwise 4-bit (NF4, FP4) quantization, double quantization and LLM.int8(), written from scratch in plain torch.

This is the reference implementation that notebooks/01_quantization_theory.ipynb explains line by line. It does
not call bitsandbytes, yet (tests/test_quant.py checks this on every run) it reproduces bitsandbytes 0.50.2:

- `quantize_4bit` returns the same packed bytes, the same absmax and (double quantization) the same 8-bit absmax
  codes, offset and second-level absmax as `bitsandbytes.functional.quantize_4bit` on the CPU, for fp32/fp16/bf16
  inputs, blocksizes 32 ... 4096 and sizes that are not a multiple of the blocksize. On a CUDA GPU bitsandbytes
  quantizes with its own kernel, and that one gives different bytes for some values: a 7B-shaped layer loaded on an
  H200 dequantized up to 7e-4 away from this function's result (notebooks/gpu-t4/01_quantization_theory.ipynb).
  The place, from bitsandbytes' source: the 8-bit codes of the double-quantized block scales, which its CPU path
  rounds through a 65,536-entry table and its CUDA kernel by a binary search. `kernel="cuda"` follows that search
  and comes closer without being exact: on an H200, of a 4096 x 4096 layer's 262,144 scale codes 14 still differ
  from bitsandbytes' CUDA result (453 with kernel="cpu"), the 4-bit codes are equal; bitsandbytes' CUDA FP4 codes
  also differ from its CPU ones (benchmarks/results/quant_bytes_h200.md);
- `dequantize_4bit` returns what bitsandbytes' reference kernel returns (the one CUDA and the pure-torch backend
  implement). Caveat, found while writing this module: bitsandbytes 0.50.2's C++ CPU kernel on CPUs with AVX-512
  reads the wrong absmax when a weight row is not a whole number of blocks (e.g. a 352-wide row in blocks of 64),
  so there `bitsandbytes.functional.dequantize_4bit` on the CPU differs from this function (and from CUDA);
- `quantize_int8_rowwise` / `dequantize_int8_rowwise` equal `int8_vectorwise_quant` / `int8_vectorwise_dequant`,
  and `int8_matmul_with_outliers` recomputes what `bitsandbytes.nn.Linear8bitLt` returns in eval mode.

`bits_per_param`, `weight_memory` and `measured_weight_memory` count bytes: what `model.get_memory_footprint()`
reports (parameters and buffers) and what it leaves out (the quantization constants kept on the side).

Works when copied alone: needs torch (and transformers only for `weight_memory` on a config). Imports no sibling.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "nf4_code", "fp4_code", "int4_code", "dynamic_code", "QuantState4bit",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit", "quantize_4bit", "dequantize_4bit",
    "quantize_int8_rowwise", "dequantize_int8_rowwise", "int8_matmul_with_outliers",
    "bits_per_param", "weight_memory", "measured_weight_memory",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # double quantization quantizes the absmax values in blocks of 256
_LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer looks the nearest code up in a table of 65536 bins


# ----------------------------------------------------------------------------------------------------------------
# The code tables ("data types"): which 16 (or 256) values a 4-bit (8-bit) code can stand for
# ----------------------------------------------------------------------------------------------------------------

def nf4_code(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NormalFloat4 values, sorted, in [-1, 1]: quantiles of N(0, 1), scaled so the largest is 1.

    8 positive quantiles at probabilities linspace(offset, 0.5, 9)[:-1], 7 negative ones at linspace(offset, 0.5,
    8)[:-1] and an exact zero: asymmetric, so that 0 is representable. With the default offset this equals the
    table hard-coded in bitsandbytes bit for bit. (01_quantization_theory)
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 values, largest first
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


def fp4_code() -> torch.Tensor:
    """The 16 FP4 values of bitsandbytes, indexed by the 4-bit code (not sorted), in [-1, 1].

    Bit 3 is the sign; bits 2-1 an exponent e, bit 0 a mantissa bit m: e = 0 is subnormal (m * 0.0625),
    otherwise (1 + m / 2) * 2 ** (4 - e). Divided by the largest magnitude (12). (01_quantization_theory)
    """
    magnitudes = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]  # codes 0b000 ... 0b111
    data = torch.tensor(magnitudes + [-m for m in magnitudes])  # -0.0 for code 0b1000
    return data / data.abs().max()


def int4_code() -> torch.Tensor:
    """Plain symmetric 4-bit integers: codes 0..15 stand for 7, 6, ..., 0, -0, ..., -7, divided by 7 (bitsandbytes'
    "int4" table; 15 distinct values). bitsandbytes does not quantize weights with it; here it is the baseline NF4
    and FP4 are compared with. (01_quantization_theory)"""
    data = torch.tensor([7.0, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7])
    return data / data.abs().max()


_CODES = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}


@functools.cache
def _cached_code(quant_type: str) -> torch.Tensor:
    return _CODES[quant_type]() if quant_type in _CODES else dynamic_code()


def dynamic_code() -> torch.Tensor:
    """The 256 sorted values of bitsandbytes' signed 8-bit "dynamic" data type (Dettmers 2015), in [-1, 1].

    A dynamic exponent: for each decade 10**-6 ... 10**0 a linear grid of fraction values, finer for the larger
    decades, mirrored for negative values, plus 0 and 1. Double quantization stores the absmax values with it.
    Same as `bitsandbytes.functional.create_dynamic_map()`. (01_quantization_theory)
    """
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Blockwise 8-bit quantization with the dynamic code (used for double quantization)
# ----------------------------------------------------------------------------------------------------------------

def _check_float(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{what} has dtype {x.dtype}: quantize float32, float16 or bfloat16 values (call .float())")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty: there is nothing to quantize")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} holds {bad} non-finite values (NaN or inf): a block's absmax would be non-finite "
                         f"and every value of the block lost. Find where they come from (a diverged training, a "
                         f"division by zero) or replace them first, e.g. torch.nan_to_num({what})")


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x flattened to fp32 and zero-padded to whole blocks, shape (number of blocks, blocksize)."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def _nearest_code_lut(code: torch.Tensor) -> torch.Tensor:
    """For each of 65536 equally spaced values v_i = -1 + 2i/65535: the index of the code value nearest to v_i
    (ties go to the lower index). This is the table bitsandbytes' CPU quantizer builds once per code."""
    return _nearest_code_lut_cached(tuple(code.tolist()))


@functools.lru_cache(maxsize=8)
def _nearest_code_lut_cached(code_values: tuple) -> torch.Tensor:
    code = torch.tensor(code_values, dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)  # = number of midpoints below v_i


def _check_kernel(kernel) -> None:
    if kernel not in ("cpu", "cuda"):
        raise ValueError(f"kernel={kernel!r}: use 'cpu' (bitsandbytes' CPU path: a 65,536-bin lookup table for 8-bit "
                         f"codes) or 'cuda' (its CUDA kernel's binary search)")


def _binary_search_code(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dQuantize<0> of bitsandbytes' csrc/kernels.cu, for all of x at once: 7 halving steps from index 127 over the
    256 sorted code values, then the nearer of the last value and its neighbour on x's side, by their midpoint."""
    pivot = torch.full(x.shape, 127, dtype=torch.long)
    upper_pivot, lower_pivot = torch.full_like(pivot, 255), torch.zeros_like(pivot)
    upper, lower = torch.ones_like(x), -torch.ones_like(x)
    value = code[pivot]
    step = 64
    while step:
        above = x > value
        lower_pivot, lower = torch.where(above, pivot, lower_pivot), torch.where(above, value, lower)
        upper_pivot, upper = torch.where(above, upper_pivot, pivot), torch.where(above, upper, value)
        pivot = torch.where(above, pivot + step, pivot - step)
        value = code[pivot]
        step >>= 1
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = x > value
    return torch.where(above, torch.where(x > (upper + value) * 0.5, upper_pivot, pivot),
                       torch.where(x < (lower + value) * 0.5, lower_pivot, pivot))


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE,
                            kernel: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x in blocks of `blocksize` values to 8-bit indices into `code` (default: `dynamic_code()`).

    Returns (indices as uint8 with x's shape, absmax as fp32, one per block). Each block is divided by its largest
    magnitude, then each value is replaced by the index of a nearest code value, found as one of bitsandbytes'
    kernels finds it. kernel="cpu": the scaled value is rounded to one of 65536 grid points and looked up in a
    precomputed table, so a value within ~1.5e-5 of the midpoint between two code values can go either way; equals
    `bitsandbytes.functional.quantize_blockwise` on the CPU (tests/test_quant.py). kernel="cuda": the binary search
    of bitsandbytes' CUDA kernel (`dQuantize` in csrc/kernels.cu), which compares with the exact midpoint; written
    from that source and checked on the CPU (it returns the nearest code); on an H200 it is closer to bitsandbytes'
    CUDA result than kernel="cpu" but not byte-equal (benchmarks/results/quant_bytes_h200.md). The two disagree
    only next to midpoints. (01_quantization_theory)
    """
    _check_kernel(kernel)
    _check_float(x, "x")
    code = _cached_code("dynamic") if code is None else code.float()
    if code.numel() != 256 or not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("code must hold 256 values sorted in increasing order, like dynamic_code()")
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    scaled = (blocks * (1.0 / safe)[:, None]).clamp(-1.0, 1.0)
    if kernel == "cuda":
        indices = _binary_search_code(code, scaled).to(torch.uint8)
    else:
        # ((v + 1) * 0.5) * 65535 + 0.5, truncated: the grid point nearest to v (each step rounded to fp32 as in C)
        grid_index = ((((scaled + 1.0) * 0.5) * float(_LUT_SIZE - 1)) + 0.5).to(torch.int64)
        indices = _nearest_code_lut(code)[grid_index]
    indices[absmax == 0] = 0  # an all-zero block is stored as index 0 (its absmax 0 makes it decode to 0)
    return indices.reshape(-1)[: x.numel()].reshape(x.shape), absmax


def dequantize_blockwise_8bit(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                              blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """fp32 values code[index] * absmax of the index's block; inverse of `quantize_blockwise_8bit`.
    (01_quantization_theory)"""
    code = _cached_code("dynamic") if code is None else code.float()
    values = torch.nn.functional.pad(code[indices.reshape(-1).long()], (0, -indices.numel() % blocksize))
    values = values.view(-1, blocksize) * absmax.float()[:, None]
    return values.reshape(-1)[: indices.numel()].reshape(indices.shape)


# ----------------------------------------------------------------------------------------------------------------
# 4-bit blockwise quantization (NF4 / FP4) with optional double quantization
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class QuantState4bit:
    """What `quantize_4bit` keeps next to the packed codes, named as in bitsandbytes' QuantState.

    absmax: fp32, one per block; or, with double quantization, uint8 indices into `nested_code`, whose values are
    nested_code[i] * nested_absmax[block of 256] + offset.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: torch.Tensor | None = None  # double quantization: mean of the fp32 absmax values (0-dim fp32)
    nested_absmax: torch.Tensor | None = None  # double quantization: fp32 absmax of each block of 256 absmax values
    nested_code: torch.Tensor | None = None  # double quantization: the 8-bit dynamic code
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def fp32_absmax(self) -> torch.Tensor:
        """The per-block scales as fp32 (decoding the double-quantized ones if needed)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_code,
                                         self.nested_blocksize) + self.offset

    def nbytes(self) -> int:
        """Bytes of the constants: absmax (fp32, or uint8 + second-level fp32 absmax + fp32 offset)."""
        tensors = [self.absmax] + ([self.nested_absmax, self.offset] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = False, kernel: str = "cpu") -> tuple[torch.Tensor, QuantState4bit]:
    """Quantize w (any shape, fp32/fp16/bf16) to 4-bit codes in blocks of `blocksize` consecutive values.

    Returns (packed, state): packed is uint8 of shape ((numel + 1) // 2, 1), two codes per byte, the first value
    of each pair in the high nibble; state holds the per-block absmax (double-quantized when double_quant) and
    what dequantization needs. quant_type: "nf4", "fp4" (both as in bitsandbytes) or "int4" (plain integers, for
    comparison only). Byte for byte what `bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    quant_type=quant_type, compress_statistics=double_quant)` returns on the CPU. kernel="cuda" quantizes the
    double-quantized statistics with the search of bitsandbytes' CUDA kernel instead (see quantize_blockwise_8bit).
    (01_quantization_theory)
    """
    _check_float(w, "w")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported: use one of {BLOCKSIZES} (64 is the QLoRA default)")
    if quant_type not in _CODES:
        raise ValueError(f"quant_type={quant_type!r} is not supported: use 'nf4' (QLoRA's default), 'fp4' or 'int4'")
    _check_kernel(kernel)
    code = _cached_code(quant_type).clone()

    # 1. One scale per block: the largest magnitude. Dividing by it maps the block into [-1, 1].
    blocks = _blocks(w, blocksize)
    absmax = blocks.abs().amax(dim=1)
    n_full = w.numel() // blocksize  # bitsandbytes divides the last, partial block instead of multiplying
    scaled_full = blocks[:n_full] * (1.0 / absmax[:n_full].clamp(min=1e-38))[:, None]
    scaled_rest = blocks[n_full:] / absmax[n_full:].clamp(min=1e-38)[:, None]
    scaled = torch.cat([scaled_full, scaled_rest]).clamp(-1.0, 1.0).reshape(-1)[: w.numel()]
    absmax[n_full:] = absmax[n_full:].clamp(min=1e-38)  # (bitsandbytes keeps the clamped value for that block)

    # 2. Nearest code value: compare with the midpoints between neighbouring (sorted) code values;
    #    a value exactly on a midpoint goes to the lower one.
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    if scaled.numel() % 2:  # an odd count is padded with a 0 to fill the last byte
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = order[torch.bucketize(scaled, midpoints, right=False)].to(torch.uint8)

    # 3. Two 4-bit codes per byte: the first value in the high nibble.
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)

    state = QuantState4bit(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                           quant_type=quant_type, code=code)
    if double_quant:
        # 4. Double quantization: subtract the mean (absmax values are all positive, the 8-bit code is signed),
        #    then quantize the absmax values themselves to 8 bits in blocks of 256.
        offset = absmax.mean()
        dynamic = _cached_code("dynamic").clone()
        state.absmax, state.nested_absmax = quantize_blockwise_8bit(absmax - offset, dynamic, NESTED_BLOCKSIZE,
                                                                    kernel=kernel)
        state.offset, state.nested_code = offset, dynamic
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState4bit) -> torch.Tensor:
    """The values the packed 4-bit codes stand for: code[q] * absmax of the block, computed in fp32, returned in
    state.dtype with state.shape. Equals bitsandbytes' reference dequantization (CUDA and the pure-torch kernel);
    see the module docstring for the one case where its AVX-512 CPU kernel differs. (01_quantization_theory)
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed has dtype {packed.dtype}: pass the uint8 tensor that quantize_4bit returned")
    n = math.prod(state.shape)
    flat = packed.reshape(-1)
    q = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].long()  # high nibble first
    values = torch.nn.functional.pad(state.code[q], (0, -n % state.blocksize)).view(-1, state.blocksize)
    values = values * state.fp32_absmax()[:, None]  # each block times its absmax, in fp32
    return values.reshape(-1)[:n].reshape(state.shape).to(state.dtype)


# ----------------------------------------------------------------------------------------------------------------
# LLM.int8(): row-wise (vector-wise) int8 quantization and the mixed-precision outlier decomposition
# ----------------------------------------------------------------------------------------------------------------

def quantize_int8_rowwise(w: torch.Tensor, threshold: float = 0.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize each row of a 2-D tensor to int8 with its own scale: round(x * 127 / absmax(row)).

    Returns (int8 values, row absmax as fp32, outlier columns). With threshold > 0 (LLM.int8()'s activations),
    values with |x| >= threshold are left out of the row absmax, and (when there is more than one row) every
    column that holds such an outlier is zeroed in the int8 result: those columns are computed in higher
    precision instead; outlier columns is then an int64 tensor (possibly empty), else None. The input is not
    changed. Equals `bitsandbytes.functional.int8_vectorwise_quant`; note that bitsandbytes casts weights and
    activations to fp16 before calling it. (01_quantization_theory)
    """
    _check_float(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w has shape {tuple(w.shape)}: pass a 2-D tensor (rows are quantized one by one); "
                         f"reshape activations to (tokens, features) first")
    outlier_cols = None
    kept = w
    if threshold > 0.0:
        outliers = w.abs() >= threshold
        outlier_cols = torch.argwhere(outliers.any(dim=0)).view(-1)
        kept = w.masked_fill(outliers, 0)
    row_absmax = kept.abs().amax(dim=1).float()
    q = torch.round(kept * (127.0 / row_absmax.unsqueeze(-1))).to(torch.int8)
    if outlier_cols is not None and w.shape[0] > 1:
        q[:, outlier_cols] = 0
    return q, row_absmax, outlier_cols


def dequantize_int8_rowwise(q: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    """fp32 values q * absmax(row) / 127; inverse of `quantize_int8_rowwise` (bitsandbytes multiplies by the
    fp32 reciprocal of 127, as here). (01_quantization_theory)"""
    return q * row_absmax.view(-1, 1) * 7.874015718698502e-3


def int8_matmul_with_outliers(x: torch.Tensor, w: torch.Tensor, threshold: float = 6.0,
                              return_parts: bool = False):
    """x @ w.T the LLM.int8() way, as `bitsandbytes.nn.Linear8bitLt(threshold=threshold)` computes it in eval mode.

    1. Weights and activations are cast to fp16 and quantized row-wise to int8 (a scale per output row of w and
       per token of x); activation columns ("features") with any |value| >= threshold are outliers.
    2. The int8 product of the other columns is computed exactly in integers and rescaled by
       absmax(x row) * absmax(w row) / 127**2.
    3. The outlier columns are multiplied in x's precision: x[:, cols] @ w_int8_dequantized[:, cols].T (bitsandbytes
       keeps only int8 weights, so it uses their dequantized values there, not the original weights).

    x: (..., in_features); w: (out_features, in_features). Returns the output in x.dtype, or with return_parts a
    dict with "output", "int8_part", "outlier_part", "outlier_cols". (01_quantization_theory)
    """
    _check_float(x, "x")
    _check_float(w, "w")
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"shapes do not multiply: x {tuple(x.shape)} @ w.T with w {tuple(w.shape)}; "
                         f"w must be (out_features, in_features) and x (..., in_features)")
    x2 = x.reshape(-1, x.shape[-1])
    cx, sx, cols = quantize_int8_rowwise(x2.to(torch.float16), threshold)
    cw, sw, _ = quantize_int8_rowwise(w.to(torch.float16))
    acc = (cx.double() @ cw.double().t()).to(torch.int32)  # exact integer accumulation
    int8_part = acc * (sx.view(-1, 1) * sw.view(1, -1)) * 6.200124e-05  # 6.200124e-05 = 1 / 127**2
    out = int8_part.to(x.dtype)
    outlier_part = torch.zeros_like(out)
    if threshold > 0.0 and cols is not None and cols.numel():
        w_cols = dequantize_int8_rowwise(cw[:, cols], sw).to(x.dtype)
        x_cols = x2[:, cols]
        outlier_part = x_cols @ w_cols.t()
        out = out.addmm(x_cols, w_cols.t())
    out = out.reshape(*x.shape[:-1], w.shape[0])
    if not return_parts:
        return out
    return {"output": out, "int8_part": int8_part.to(x.dtype).reshape(out.shape),
            "outlier_part": outlier_part.reshape(out.shape), "outlier_cols": cols}


# ----------------------------------------------------------------------------------------------------------------
# Memory: bits per parameter, bytes of a model
# ----------------------------------------------------------------------------------------------------------------

#: the dtype names qadapter_utils accepts (models' compute_dtype, the memory estimator, bits_per_param)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_BITS = {name: dtype.itemsize * 8 for name, dtype in DTYPES.items()}


def bits_per_param(quant_type: str, blocksize: int = 64, double_quant: bool = False,
                   row_length: int | None = None) -> float:
    """Bits of storage per weight, constants included (code tables and the one offset per tensor left out).

    "nf4"/"fp4"/"int4": 4 + 32 / blocksize (an fp32 absmax per block), or with double quantization
    4 + 8 / blocksize + 32 / (blocksize * 256): 4.5 and 4.127 at blocksize 64, the QLoRA paper's numbers.
    "int8": 8, plus 32 / row_length for the fp32 scale of each row when row_length (in_features) is given.
    "fp16"/"bf16"/"fp32": 16 or 32. (01_quantization_theory)
    """
    if quant_type in DTYPE_BITS:
        return float(DTYPE_BITS[quant_type])
    if quant_type == "int8":
        return 8.0 + (32.0 / row_length if row_length else 0.0)
    if quant_type not in _CODES:
        raise ValueError(f"quant_type={quant_type!r} is not supported: use 'nf4', 'fp4', 'int4', 'int8', 'fp16', "
                         f"'bf16' or 'fp32'")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported: use one of {BLOCKSIZES}")
    if double_quant:
        return 4.0 + 8.0 / blocksize + 32.0 / (blocksize * NESTED_BLOCKSIZE)
    return 4.0 + 32.0 / blocksize


def _as_model(model_or_config):
    """A model to count: the model itself, or one built on the meta device (no memory) from a config."""
    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    if hasattr(model_or_config, "to_json_string") and hasattr(model_or_config, "model_type"):
        return _meta_model(model_or_config.to_json_string())
    raise TypeError(f"weight_memory needs a torch model or a transformers config, got "
                    f"{type(model_or_config).__name__}: e.g. qadapter_utils.model_config('llama2-7b')")


@functools.lru_cache(maxsize=4)
def _meta_model(config_json: str):
    import json

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    config_dict = json.loads(config_json)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with torch.device("meta"), no_init_weights():  # shapes only: no memory, no (slow) weight initialisation
        return AutoModelForCausalLM.from_config(config)


def _quantized_linears(model) -> dict[str, torch.nn.Linear]:
    """The linear layers bitsandbytes quantizes through transformers: every nn.Linear (Linear4bit and
    Linear8bitLt are subclasses) except the output embedding (lm_head)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not out_emb}


def weight_memory(model_or_config, bits: int | None = 4, quant_type: str = "nf4", double_quant: bool = False,
                  blocksize: int = 64, compute_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes a model's weights take when loaded with bitsandbytes at `bits` (4, 8 or None for unquantized).

    model_or_config: a model (its layer shapes are used, quantized or not) or a transformers config (e.g.
    `qadapter_utils.model_config("llama2-7b")`, counted on the meta device without allocating). Linear layers
    except lm_head are quantized; embeddings, lm_head, norms and biases stay in compute_dtype (default: the
    dtype of the model's input embeddings, or fp16 for a config). Returns a dict of byte counts:

    - "quantized_weights": the linear weights as stored (packed 4-bit codes, int8, or compute_dtype if bits=None)
    - "constants": quantization constants (fp32 absmax per block, or with double quantization uint8 absmax +
      fp32 absmax per 256 blocks + an fp32 offset; for int8 an fp32 scale per output row)
    - "code_tables": the per-layer copies of the code (16 fp32 values, + 256 with double quantization)
    - "other_weights": embeddings, lm_head, norms, biases (in compute_dtype)
    - "buffers": non-parameter tensors such as the rotary inv_freq (in their own dtype)
    - "footprint": quantized_weights + other_weights + buffers = what `model.get_memory_footprint()` reports
    - "total": footprint + constants + code_tables, the bytes really held. (01_quantization_theory)
    """
    if bits not in (None, 4, 8):
        raise ValueError(f"bits={bits!r} is not supported: use 4 (NF4/FP4), 8 (LLM.int8()) or None (unquantized)")
    if bits == 4 and quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r}: bitsandbytes stores 4-bit weights as 'nf4' or 'fp4'")
    if bits == 4 and blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported: use one of {BLOCKSIZES}")
    model = _as_model(model_or_config)
    if compute_dtype is None:
        if isinstance(model_or_config, torch.nn.Module) and hasattr(model, "get_input_embeddings"):
            compute_dtype = model.get_input_embeddings().weight.dtype
        else:
            compute_dtype = torch.float16
    elem = torch.empty(0, dtype=compute_dtype).element_size()
    linears = _quantized_linears(model)
    quantized_weight_ids = {id(m.weight) for m in linears.values()}

    out = dict(quantized_weights=0, constants=0, code_tables=0, other_weights=0, buffers=0)
    for m in linears.values():
        n = m.in_features * m.out_features
        if bits == 4:
            blocks = -(-n // blocksize)
            out["quantized_weights"] += (n + 1) // 2
            if double_quant:
                out["constants"] += blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4
                out["code_tables"] += 4 * (16 + 256)
            else:
                out["constants"] += 4 * blocks
                out["code_tables"] += 4 * 16
        elif bits == 8:
            out["quantized_weights"] += n
            out["constants"] += 4 * m.out_features
        else:
            out["quantized_weights"] += n * elem
    for p in model.parameters():  # deduplicated: tied weights count once, as in get_memory_footprint
        if id(p) not in quantized_weight_ids:
            out["other_weights"] += p.numel() * elem
    out["buffers"] = sum(b.numel() * b.element_size() for b in model.buffers())
    out["footprint"] = out["quantized_weights"] + out["other_weights"] + out["buffers"]
    out["total"] = out["footprint"] + out["constants"] + out["code_tables"]
    return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def measured_weight_memory(model) -> dict[str, int]:
    """The same breakdown as `weight_memory`, measured on a loaded model's tensors: parameters and buffers (what
    `get_memory_footprint` adds up) plus the bitsandbytes quantization state it does not see (Linear4bit
    `weight.quant_state`: absmax, nested absmax, offset, code tables; Linear8bitLt: the row scales SCB).

    On CPUs with AVX-512 BF16, bitsandbytes repacks a Linear4bit at its first eval-mode forward: the weight bytes
    are reordered (same count) and the absmax becomes bf16 without double quantization; this function then
    reports those bytes as they are. (01_quantization_theory)
    """
    linears = _quantized_linears(model)
    quantized_weight_ids = set()
    out = dict(quantized_weights=0, constants=0, code_tables=0, other_weights=0, buffers=0)
    for m in linears.values():
        state = getattr(m.weight, "quant_state", None)
        scb = getattr(m.weight, "SCB", None)
        if scb is None and getattr(m, "state", None) is not None:
            scb = getattr(m.state, "SCB", None)
        quantized_weight_ids.add(id(m.weight))
        out["quantized_weights"] += _nbytes(m.weight)  # packed codes, int8, or the full weight if not quantized
        if state is not None:
            nested = getattr(state, "state2", None) if getattr(state, "nested", False) else None
            out["constants"] += _nbytes(state.absmax)
            out["code_tables"] += _nbytes(state.code)
            if nested is not None:
                out["constants"] += _nbytes(nested.absmax) + _nbytes(state.offset)
                out["code_tables"] += _nbytes(nested.code)
        elif scb is not None:
            out["constants"] += _nbytes(scb)
    for p in model.parameters():
        if id(p) not in quantized_weight_ids:
            out["other_weights"] += _nbytes(p)
    out["buffers"] = sum(_nbytes(b) for b in model.buffers())
    out["footprint"] = out["quantized_weights"] + out["other_weights"] + out["buffers"]
    out["total"] = out["footprint"] + out["constants"] + out["code_tables"]
    return out
