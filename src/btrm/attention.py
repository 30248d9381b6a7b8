"""Attention backends for packed rows: one table that the config, the CLIs, the trainer, the scorer and
scripts/gpu_check.py all read.

A packed row is one sequence of concatenated segments whose `position_ids` restart at 0; the segment boundaries
travel as `cu_seq_lens_q/k` (int32 [n_seg + 1]) through transformers' attention kwargs.

| name | transformers name | runs on | dtypes | needs |
|---|---|---|---|---|
| flash_attention_2 | flash_attention_2 | CUDA | fp16, bf16 | the flash-attn package |
| varlen | btrm_varlen | CUDA | fp16, bf16 | torch >= 2.11 (`torch.nn.attention.varlen.varlen_attn`) |
| segment | btrm_segment | any | any | nothing: per-segment SDPA, cost sum(s_i^2), not T^2 |
| sdpa / eager | sdpa / eager | any | any | transformers' dense block mask from position_ids (cost T^2) |

`auto` takes the first of flash_attention_2, varlen, segment that can run on the device in the dtype, and logs
one line naming it and why the faster ones were passed over. `varlen_attn`'s signature changed between torch
releases, so it is probed once (`probe_varlen`) and called the way this torch accepts (`varlen_attention`).

Rows where an item's prompt is packed once (`btrm.data.prefix`) carry their layout as the `prefix_layout`
keyword: segment, varlen and flash_attention_2 read it (`btrm.prefix_attention`), sdpa and eager get an explicit
mask (`Backend.shares_prompt`). For flash_attention_2 we register `flash_attention` under transformers' own name:
rows without a layout go to transformers' function unchanged, rows with one to flash-attn's varlen kernel.

Adding a backend: write its function here, add a `Backend` row to `BACKENDS`, and test it in
tests/core/test_attention.py.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# torch and transformers are imported where used, so btrm.config can read CHOICES without loading them.
HALF = ("float16", "bfloat16")  # what the flash kernels (flash-attn's and torch's varlen) accept
LAYOUT_KWARG = "prefix_layout"  # the shared-prefix layout's keyword through the decoder to the attention function


# ----------------------------------------------------------------------------------------------------------------------
# Per-segment SDPA (any device, any dtype)


def _bounds(kwargs, total: int) -> list[int]:
    cu = kwargs.get("cu_seq_lens_q")
    return [0, total] if cu is None else [int(x) for x in cu.tolist()]


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> [1, T, Hq, D]; causal attention within each segment."""
    import torch
    import torch.nn.functional as F

    if kwargs.get(LAYOUT_KWARG) is not None:  # a shared-prefix row (btrm.data.prefix)
        from btrm.prefix_attention import segment_prefix_attention

        return segment_prefix_attention(query, key, value, kwargs[LAYOUT_KWARG], scaling,
                                        dropout if module.training else 0.0), None
    if query.shape[0] != 1:
        raise ValueError("btrm_segment attention expects one packed row (batch size 1)")
    bounds = _bounds(kwargs, query.shape[2])
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    gqa = query.shape[1] != key.shape[1]
    outs = []
    # split, not one slice per segment: a slice's backward writes into a zero tensor of the whole row, so n
    # slices cost n full-row gradients per q/k/v; split's backward is one concatenation.
    for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2)):
        outs.append(F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, dropout_p=dropout if module.training else 0.0, enable_gqa=gqa))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------------------------------------------------
# torch's varlen flash kernel, called the way the installed torch accepts


@dataclass(frozen=True)
class VarlenAPI:
    """What a `varlen_attn` accepts. torch 2.11: no GQA flag (GQA works when the head counts divide); torch 2.13:
    `enable_gqa`, required when the head counts differ. Both: causal iff `window_size == (-1, 0)` as a tuple."""

    kernel: Callable
    gqa_flag: bool


def probe_varlen(kernel: Callable | None = None) -> VarlenAPI | str:
    """The API of `kernel` (default: torch's `varlen_attn`), or why it cannot serve as a causal packed kernel."""
    import torch

    if kernel is None:
        try:
            from torch.nn.attention.varlen import varlen_attn as kernel
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs torch >= 2.11)"
    params = inspect.signature(kernel).parameters
    # torch 2.9/2.10 took `is_causal` and no `scale`: not supported (the floor is 2.11)
    missing = [p for p in ("window_size", "scale") if p not in params]
    if missing:
        return f"torch {torch.__version__} varlen_attn has no {', '.join(missing)} (needs torch >= 2.11)"
    return VarlenAPI(kernel, "enable_gqa" in params)


@functools.cache
def torch_varlen() -> VarlenAPI | str:
    """The installed torch's varlen API, probed once per process."""
    return probe_varlen()


def make_varlen_attention(api: VarlenAPI | None = None) -> Callable:
    """A transformers attention function over `api`'s kernel (None: the installed torch's, probed on first call)."""

    def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        import torch

        a = api or torch_varlen()
        if isinstance(a, str):
            raise RuntimeError(f"btrm_varlen attention: {a}")
        if kwargs.get(LAYOUT_KWARG) is not None:  # a shared-prefix row: two calls, keys gathered per branch
            from btrm.prefix_attention import varlen_prefix_attention

            def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale):
                extra = {"enable_gqa": q.shape[1] != k.shape[1]} if a.gqa_flag else {}
                return a.kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0), **extra)

            return varlen_prefix_attention(query, key, value, kwargs[LAYOUT_KWARG], kernel, scaling), None
        if query.shape[0] != 1:
            raise ValueError("btrm_varlen attention expects one packed row (batch size 1)")
        t = query.shape[2]
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            cu, max_len = torch.tensor([0, t], dtype=torch.int32, device=query.device), t
        else:
            cu = cu.to(device=query.device, dtype=torch.int32).contiguous()
            max_len = int(kwargs.get("max_length_q") or t)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
        extra = {"enable_gqa": q.shape[1] != k.shape[1]} if a.gqa_flag else {}
        out = a.kernel(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0), **extra)
        return out[None], None

    return varlen_attention


varlen_attention = make_varlen_attention()


# ----------------------------------------------------------------------------------------------------------------------
# flash-attn's varlen kernel, for shared-prefix rows under flash_attention_2


def probe_flash(kernel: Callable | None = None) -> Callable | str:
    """`kernel` (default: flash-attn's `flash_attn_varlen_func`), or why it cannot serve shared-prefix rows. We pass
    only what every flash-attn 2 release takes (q, k, v, cu_seqlens_q/k, max_seqlen_q/k, dropout_p, softmax_scale,
    causal: 2.0 through 2.8); window_size, deterministic, softcap and block_table came later."""
    if kernel is None:
        try:
            from flash_attn import flash_attn_varlen_func as kernel
        except ImportError as e:
            return f"flash-attn cannot be imported ({e})"
    missing = [p for p in ("dropout_p", "softmax_scale", "causal") if p not in inspect.signature(kernel).parameters]
    if missing:
        return f"flash_attn_varlen_func has no {', '.join(missing)}"
    return kernel


@functools.cache
def flash_varlen() -> Callable | str:
    """The installed flash-attn's varlen kernel, probed once per process."""
    return probe_flash()


def flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' flash_attention_2 function, which rows with a `prefix_layout` bypass: their two varlen calls
    (btrm.prefix_attention) run on `flash_attn_varlen_func`, whose causal mask aligns bottom-right when a sequence
    has fewer queries than keys (flash-attn >= 2.1; `_flash_attn_missing` asks for 2.3.3)."""
    from transformers.integrations.flash_attention import flash_attention_forward, get_target_dtype

    layout = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return flash_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       **kwargs)
    from btrm.prefix_attention import varlen_prefix_attention

    fn = flash_varlen()
    if isinstance(fn, str):
        raise RuntimeError(f"flash_attention_2 attention: {fn}")
    target = get_target_dtype(query, module)  # as transformers does: fp32 activations (e.g. PEFT) -> half
    if target is not None:
        query, key, value = (x.to(target) for x in (query, key, value))
    p = dropout if module.training else 0.0

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        return fn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), dropout_p=p, softmax_scale=scale, causal=True)

    return varlen_prefix_attention(query, key, value, layout, kernel, scaling), None


def _no_mask(*args, **kwargs):
    return None  # boundaries travel as cu_seq_lens_q; no dense mask is built


def register(hf_name: str, function: Callable) -> None:
    """Make `function` a transformers attention implementation that reads cu_seq_lens (no dense mask). A name
    transformers already has (flash_attention_2) keeps its own mask function, which padded batches need."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(hf_name, function)
    if hf_name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(hf_name, _no_mask)


# ----------------------------------------------------------------------------------------------------------------------
# The table


FLASH_ATTN_FLOOR = "2.3.3"  # transformers' own floor for flash_attention_2; the causal mask is bottom-right since 2.1


def _flash_attn_missing() -> str | None:
    from transformers.utils import is_flash_attn_greater_or_equal

    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn not installed (pip install 'btrm[flash]')"
    if not is_flash_attn_greater_or_equal(FLASH_ATTN_FLOOR):
        return f"flash-attn older than {FLASH_ATTN_FLOOR} (or not the flash-attn distribution)"
    return None


def _varlen_missing() -> str | None:
    api = torch_varlen()
    return api if isinstance(api, str) else None


@dataclass(frozen=True)
class Backend:
    name: str
    """The config / CLI name (`model.attn_implementation`, `--attn-implementation`)."""
    hf_name: str
    """The transformers `attn_implementation` it registers or maps to."""
    summary: str
    """One line for help texts and docs."""
    devices: tuple[str, ...] | None = None
    """Device types it runs on (None: any)."""
    dtypes: tuple[str, ...] | None = None
    """Dtypes it runs in, as torch names ("bfloat16"; None: any)."""
    function: Callable | None = None
    """Our attention function, registered under `hf_name` (None: transformers' own)."""
    missing: Callable[[], str | None] | None = None
    """Probe of this installation: why it cannot run here, or None."""
    shares_prompt: str | None = None
    """How it takes a shared-prefix row (btrm.data.prefix): "layout" (reads the `prefix_layout` keyword) or "mask"
    (an explicit dense mask). An implementation outside this table cannot (`prefix_attention.sharing_mode`)."""


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("flash_attention_2", "flash_attention_2", "flash-attn's varlen kernel (CUDA, fp16/bf16, optional extra)",
            devices=("cuda",), dtypes=HALF, function=flash_attention, missing=_flash_attn_missing,
            shares_prompt="layout"),
    Backend("varlen", "btrm_varlen", "torch's own varlen flash kernel (CUDA, fp16/bf16, torch >= 2.11)",
            devices=("cuda",), dtypes=HALF, function=varlen_attention, missing=_varlen_missing,
            shares_prompt="layout"),
    Backend("segment", "btrm_segment", "per-segment SDPA, cost sum(s_i^2) (any device and dtype)",
            function=segment_attention, shares_prompt="layout"),
    Backend("sdpa", "sdpa", "transformers' SDPA with a dense block mask from position_ids (cost T^2)",
            shares_prompt="mask"),
    Backend("eager", "eager", "transformers' eager attention with the dense block mask (cost T^2)",
            shares_prompt="mask"),
)}
AUTO_ORDER = ("flash_attention_2", "varlen", "segment")  # fastest first; segment runs everywhere
CHOICES = ("auto", *BACKENDS)  # what config and CLIs accept
SEGMENT = BACKENDS["segment"].hf_name
VARLEN = BACKENDS["varlen"].hf_name



@functools.cache
def register_all() -> None:
    """Register our functions with transformers (once; btrm.modeling does it on import)."""
    for b in BACKENDS.values():
        if b.function is not None:
            register(b.hf_name, b.function)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def why_not(backend: Backend, device: torch.device | str, dtype: torch.dtype,
            probes: dict[str, str | None] | None = None) -> str | None:
    """Why `backend` cannot run on `device` in `dtype` (None: it can). `probes` overrides the installation probes
    by backend name (tests: another torch's varlen signature, flash-attn present or not)."""
    import torch

    kind = torch.device(device).type
    if backend.devices is not None and kind not in backend.devices:
        return f"needs {'/'.join(backend.devices).upper()}, not {kind}"
    if backend.dtypes is not None and _dtype_name(dtype) not in backend.dtypes:
        return f"runs in {'/'.join(backend.dtypes)} only, not {_dtype_name(dtype)}"
    if probes is not None and backend.name in probes:
        return probes[backend.name]
    return backend.missing() if backend.missing is not None else None


def select(name: str, device: torch.device | str, dtype: torch.dtype,
           probes: dict[str, str | None] | None = None) -> str:
    """The transformers attn_implementation for the config's choice on `device` in `dtype`.

    `auto` picks the first of AUTO_ORDER that can run and logs one line saying which and why; an explicit name
    that cannot run here is an error saying why.
    """
    import torch

    register_all()
    if name == "auto":
        skipped = []
        for cand in AUTO_ORDER:
            reason = why_not(BACKENDS[cand], device, dtype, probes)
            if reason is None:
                b = BACKENDS[cand]
                why = "; ".join(skipped) or "first choice"
                log.info("attention: auto -> %s on %s/%s (%s)", b.hf_name, torch.device(device).type,
                         _dtype_name(dtype), why)
                return b.hf_name
            skipped.append(f"{cand}: {reason}")
        raise AssertionError("segment attention runs everywhere")  # unreachable: segment has no needs
    if name not in BACKENDS:
        raise ValueError(f"attn_implementation {name!r}: expected one of {', '.join(CHOICES)}")
    reason = why_not(BACKENDS[name], device, dtype, probes)
    if reason is not None:
        raise ValueError(f"attn_implementation={name} cannot run here: {reason}; use 'auto' or 'segment'")
    return BACKENDS[name].hf_name


def help_text() -> str:
    """The `--attn-implementation` help of every CLI."""
    return "auto (the fastest that runs on this device and dtype), " + ", ".join(
        f"{b.name}: {b.summary}" for b in BACKENDS.values())
