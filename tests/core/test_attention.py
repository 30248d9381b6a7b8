"""The CUDA attention path, checked on CPU: our varlen function run through stand-ins with exactly torch 2.11's and
2.13's `varlen_attn` signatures and argument checks must give the `segment` backend's packed rewards and BT
gradients; `auto` must pick a backend that runs for every (device, dtype, torch signature); DeepSpeed's bf16 cast
must leave the rotary buffers in fp32."""

from __future__ import annotations

import inspect
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from btrm import attention
from btrm.attention import SEGMENT, VARLEN, make_varlen_attention, probe_varlen, segment_attention
from btrm.data.packing import collate_pairs
from btrm.loss import bt_loss
from btrm.modeling import ensure_pad_token, load_reward_model, packed_rewards
from btrm.render import render_ids

# ----------------------------------------------------------------------------------------------------------------------
# Stand-ins for torch's varlen_attn: the exact signatures and argument checks, computed with per-segment SDPA.


def _varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, half_only):
    for name, cu in (("cu_seq_q", cu_seq_q), ("cu_seq_k", cu_seq_k)):
        if cu.dtype != torch.int32 or not cu.is_contiguous() or cu.dim() != 1:
            raise RuntimeError(f"{name} must be a contiguous 1-D int32 tensor")
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise RuntimeError("query/key/value must be [T, H, D]")
    if half_only and query.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only supports fp16 and bf16 data type")
    if query.size(1) % key.size(1):
        raise RuntimeError("number of heads in key/value must divide number of heads in query")
    bounds = cu_seq_q.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[-1] != query.size(0) or max(lengths) > max_q or max(lengths) > max_k:
        raise RuntimeError("cu_seqlens / max lengths do not describe the row")
    is_causal = window_size == (-1, 0)  # like torch: a list [-1, 0] is not causal
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[a:b].transpose(0, 1)[None] for x in (query, key, value))
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                                   enable_gqa=q.shape[1] != k.shape[1])[0].transpose(0, 1))
    return torch.cat(outs)


def standin_2_11(half_only=False):
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        return _varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, half_only)
    return varlen_attn


def standin_2_13(half_only=False):
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        hq, hk = query.size(1), key.size(1)
        if not enable_gqa and hq != hk:
            raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={hq} and "
                             f"Hkv={hk}. Try setting enable_gqa=True for GQA.")
        return _varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, half_only)
    return varlen_attn


def standin_2_9(half_only=False):  # is_causal, no scale, no window_size: below our floor
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
        raise AssertionError("never called")
    return varlen_attn


STANDINS = {"2.11": standin_2_11, "2.13": standin_2_13}


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_standin_2_13_has_the_installed_torch_signature():
    from torch.nn.attention.varlen import varlen_attn

    if not torch.__version__.startswith("2.13"):
        pytest.skip(f"torch {torch.__version__}")
    assert _params(standin_2_13()) == _params(varlen_attn)
    assert probe_varlen() == attention.VarlenAPI(varlen_attn, gqa_flag=True)


def test_probe_reads_each_signature():
    assert probe_varlen(standin_2_11()).gqa_flag is False
    assert probe_varlen(standin_2_13()).gqa_flag is True
    assert "needs torch >= 2.11" in probe_varlen(standin_2_9())


def test_standins_reject_what_torch_rejects():
    q, kv = torch.randn(6, 4, 8), torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(TypeError):  # what every forward hit on torch 2.11 when enable_gqa was always passed
        standin_2_11()(q, kv, kv, cu, cu, 4, 4, window_size=(-1, 0), enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        standin_2_13()(q, kv, kv, cu, cu, 4, 4, window_size=(-1, 0))
    with pytest.raises(RuntimeError, match="int32"):
        standin_2_13()(q, kv, kv, cu.long(), cu.long(), 4, 4, window_size=(-1, 0), enable_gqa=True)
    with pytest.raises(RuntimeError, match="fp16 and bf16"):
        standin_2_13(half_only=True)(q, kv, kv, cu, cu, 4, 4, window_size=(-1, 0), enable_gqa=True)
    causal = standin_2_11()(q, kv, kv, cu, cu, 4, 4, window_size=(-1, 0))
    as_list = standin_2_11()(q, kv, kv, cu, cu, 4, 4, window_size=[-1, 0])  # a list silently means non-causal
    assert (causal - as_list).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# Our varlen function through each stand-in == the segment backend (fp32), rewards and BT gradients


def _conversations(tok, n):
    words = "the cat sat on a warm mat while rain fell over quiet hills".split()
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": " ".join(words[:3 + (5 * i) % 9])},
                {"role": "assistant", "content": " ".join(words[(2 * i) % 5:(2 * i) % 5 + 2 + i % 7])}]
        out.append(render_ids(tok, msgs))
    return out


def _rewards_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    r = packed_rewards(model, batch)
    bt_loss(r[0::2], r[1::2])[0].backward()
    return r.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_varlen_through_torch_signatures_matches_segment(family, tiny_llama_dir, tiny_qwen3_dir):
    path = str(tiny_llama_dir if family == "llama" else tiny_qwen3_dir)
    tok = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tok)
    model = load_reward_model(path, tok, attn_implementation=SEGMENT, seed=3, head_init_std=1.0)
    assert model.config.num_attention_heads != model.config.num_key_value_heads  # GQA: the 2.11/2.13 difference
    seqs = _conversations(tok, 6)
    batch = collate_pairs(seqs[0::2], seqs[1::2])
    r_seg, g_seg = _rewards_and_grads(model, batch)
    for version, standin in STANDINS.items():
        name = f"btrm_varlen_test_{version}"
        attention.register(name, make_varlen_attention(probe_varlen(standin())))
        model.set_attn_implementation(name)
        r, g = _rewards_and_grads(model, batch)
        assert (r - r_seg).abs().max().item() <= 1e-5, version
        assert g.keys() == g_seg.keys()
        for n in g:
            assert (g[n] - g_seg[n]).abs().max().item() <= 1e-5, (version, n)
        model.set_attn_implementation(SEGMENT)


# ----------------------------------------------------------------------------------------------------------------------
# auto picks a backend that runs, for every (device, dtype, torch signature, flash-attn installed)

SIGNATURES = {"2.11": standin_2_11, "2.13": standin_2_13, "2.9": standin_2_9, "absent": None}


def _expected(device, dtype, api, flash):
    half = dtype in (torch.float16, torch.bfloat16)
    if device == "cuda" and half and flash:
        return "flash_attention_2"
    if device == "cuda" and half and not isinstance(api, str):
        return VARLEN
    return SEGMENT


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("signature", list(SIGNATURES))
def test_auto_picks_a_backend_that_runs(signature, flash, caplog):
    make = SIGNATURES[signature]
    g = torch.Generator().manual_seed(0)
    for device in ("cpu", "cuda"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            api = probe_varlen(make(half_only=device == "cuda")) if make else "torch has no varlen_attn"
            probes = {"varlen": api if isinstance(api, str) else None,
                      "flash_attention_2": None if flash else "flash-attn not installed"}
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="btrm.attention"):
                chosen = attention.select("auto", device, dtype, probes)
            assert chosen == _expected(device, dtype, api, flash), (device, dtype, signature, flash)
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == 1 and chosen in lines[0], lines  # one line naming the choice and why
            if chosen == "flash_attention_2":
                continue  # the flash-attn package: nothing to run on CPU
            # run the chosen function in this dtype (CPU tensors; the stand-in enforces the CUDA kernel's dtypes)
            q = torch.randn(1, 4, 7, 8, generator=g).to(dtype)
            k, v = (torch.randn(1, 2, 7, 8, generator=g).to(dtype) for _ in range(2))
            kw = {"cu_seq_lens_q": torch.tensor([0, 3, 7], dtype=torch.int32), "max_length_q": 4}
            module = torch.nn.Module()
            fn = make_varlen_attention(api) if chosen == VARLEN else segment_attention
            out, _ = fn(module, q, k, v, None, scaling=8 ** -0.5, **kw)
            ref, _ = segment_attention(module, q.float(), k.float(), v.float(), None, scaling=8 ** -0.5, **kw)
            assert out.shape == (1, 7, 4, 8) and out.dtype == dtype
            assert (out.float() - ref).abs().max().item() <= (1e-6 if dtype == torch.float32 else 2e-2)


def test_explicit_backend_that_cannot_run_says_why():
    with pytest.raises(ValueError, match="float32"):
        attention.select("varlen", "cuda", torch.float32, {"varlen": None})
    with pytest.raises(ValueError, match="CUDA"):
        attention.select("varlen", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="flash-attn not installed"):
        attention.select("flash_attention_2", "cuda", torch.bfloat16, {"flash_attention_2": "flash-attn not installed"})
    assert attention.select("sdpa", "cuda", torch.float32) == "sdpa"


def test_flash_attn_older_than_transformers_floor_is_passed_over(monkeypatch):
    """flash-attn 2.0 aligned the causal mask top-left (shared-prefix rows need bottom-right, 2.1+); transformers
    5 takes flash_attention_2 only from 2.3.3 on. An installed older one is a reason, not a crash at load."""
    import importlib.util

    import transformers.utils

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    for installed, expect in (("2.0.9", "older than 2.3.3"), ("2.8.3", None)):
        monkeypatch.setattr(transformers.utils, "is_flash_attn_greater_or_equal",
                            lambda v, i=installed: tuple(map(int, i.split("."))) >= tuple(map(int, v.split("."))))
        reason = attention.why_not(attention.BACKENDS["flash_attention_2"], "cuda", torch.bfloat16)
        assert (reason is None) if expect is None else (expect in reason), (installed, reason)


def test_config_and_clis_read_the_table():
    import argparse
    import typing

    from btrm.config import ModelConfig
    from btrm.inference import cli_score

    assert typing.get_args(typing.get_type_hints(ModelConfig)["attn_implementation"]) == attention.CHOICES
    p = argparse.ArgumentParser()
    cli_score.add_arguments(p)
    action = next(a for a in p._actions if a.dest == "attn_implementation")
    assert tuple(action.choices) == attention.CHOICES and "varlen" in action.help


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed's bf16 cast: parameters only, the rotary inv_freq stays fp32 (deepspeed >= 0.19.2)

_DS_SCRIPT = """
import json, os, socket, sys, logging
import torch, deepspeed
from transformers import AutoTokenizer
from btrm.config import Config
from btrm.modeling import ensure_pad_token, load_reward_model
from btrm.train.ds_config import build_ds_config

with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
tok = AutoTokenizer.from_pretrained(sys.argv[1]); ensure_pad_token(tok)
model = load_reward_model(sys.argv[1], tok, dtype=torch.float32)
cfg = Config(); cfg.deepspeed.zero_stage = 1
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                  config=build_ds_config(cfg, 1, torch.bfloat16, "cpu"))
print(json.dumps({"params": sorted({str(p.dtype) for p in engine.module.parameters()}),
                  "inv_freq": sorted({str(b.dtype) for n, b in engine.module.named_buffers() if "inv_freq" in n})}))
"""


@pytest.mark.slow
def test_deepspeed_bf16_keeps_rotary_buffers_fp32(tiny_llama_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_DS_SCRIPT), str(tiny_llama_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"params": ["torch.bfloat16"], "inv_freq": ["torch.float32"]}, got


def test_zero0_with_bf16_warns(caplog):
    from btrm.config import Config
    from btrm.train.ds_config import build_ds_config

    cfg = Config()
    cfg.deepspeed.zero_stage = 0
    with caplog.at_level(logging.WARNING, logger="btrm.train.ds_config"):
        build_ds_config(cfg, 1, torch.float32, "cpu")
        assert not caplog.records
        build_ds_config(cfg, 1, torch.bfloat16, "cuda")
    assert len(caplog.records) == 1 and "zero_stage >= 1" in caplog.records[0].getMessage()
