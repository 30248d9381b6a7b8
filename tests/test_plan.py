"""`btrm plan`: parameter counts against transformers, model-state memory against DeepSpeed's own estimators,
activation memory against the tensors autograd really saves, and the command line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from btrm.cli import main
from btrm.config import load_config
from btrm.modeling import enable_activation_checkpointing
from btrm.plan import ARCHS, GiB, HUB_IDS, Arch, activation_bytes, model_state_bytes, param_counts, resolve_arch

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "skywork-reward-v2"
RELEASED = ["llama-3.1-8b", "llama-3.1-8b-40m", "llama-3.2-1b", "llama-3.2-3b",
            "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b"]
SETUPS = [(2, 1), (8, 1), (8, 8)]  # (GPUs per node, nodes)


def hf_config(a: Arch, **extra):
    from transformers import LlamaConfig, Qwen3Config

    cls = Qwen3Config if a.qk_norm else LlamaConfig
    return cls(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
               num_key_value_heads=a.kv_heads, head_dim=a.head_dim, intermediate_size=a.intermediate,
               vocab_size=a.vocab, tie_word_embeddings=a.tie_word_embeddings, num_labels=1, pad_token_id=0, **extra)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_param_count_matches_transformers(name):
    """The reward model built from the known sizes (meta device, no weights) has exactly the counted parameters."""
    from transformers import AutoModelForSequenceClassification

    a = ARCHS[name]
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(hf_config(a))
    unique = {id(p): p.numel() for p in model.parameters()}
    largest_leaf = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    counts = param_counts(a)
    assert counts["total"] == sum(unique.values())
    assert counts["largest_layer"] == largest_leaf
    assert a == ARCHS[HUB_IDS[next(k for k, v in HUB_IDS.items() if v == name)]]


def deepspeed_estimates(params: int, largest: int, gpus: int, nodes: int) -> dict[tuple, float]:
    """GPU bytes from DeepSpeed's estimators, keyed by (stage, offload_optimizer, offload_param)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    out = {}
    for off in (False, True):
        out[(2, off, False)] = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=off)[1]
    for off_opt, off_param in ((False, False), (True, False), (True, True)):
        out[(3, off_opt, off_param)] = estimate_zero3_model_states_mem_needs(
            params, largest, gpus, nodes, cpu_offload=off_opt, cpu_offload_params=off_param)[1]
    return out


def test_model_states_within_10_percent_of_deepspeed():
    worst = (0.0, None)
    for name in RELEASED:
        a, _ = resolve_arch(load_config(RECIPES / f"{name}.yaml").model.name_or_path)
        c = param_counts(a)
        for gpus, nodes in SETUPS:
            for (stage, oo, op), theirs in deepspeed_estimates(c["total"], c["largest_layer"], gpus, nodes).items():
                ours = model_state_bytes(c["total"], c["largest_layer"], stage, gpus, nodes, oo, op)["gpu_total"]
                dev = abs(ours - theirs) / theirs
                assert dev <= 0.10, (name, gpus, nodes, stage, oo, op, ours / GiB, theirs / GiB)
                worst = max(worst, (dev, (name, gpus * nodes, stage, oo, op)))
    print(f"max deviation from DeepSpeed's estimators: {worst[0]:.2%} at {worst[1]}")


def test_all_cold_printouts_agree(capsys):
    """The *_all_cold functions named in the issue print their tables; read them back for one case."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    c = param_counts(ARCHS["llama-3.1-8b"])
    capsys.readouterr()
    estimate_zero2_model_states_mem_needs_all_cold(c["total"], num_gpus_per_node=8, num_nodes=8)
    estimate_zero3_model_states_mem_needs_all_cold(c["total"], c["largest_layer"], num_gpus_per_node=8, num_nodes=8)
    rows = re.findall(r"GB \|\s*([\d.]+)GB \| (.*)", capsys.readouterr().out)
    assert len(rows) == 8
    for gb, options in rows:
        oo = "offload_optimizer=none" not in options
        op = "offload_param=" in options and "offload_param=none" not in options
        stage = 3 if "zero_init" in options else 2
        ours = model_state_bytes(c["total"], c["largest_layer"], stage, 8, 8, oo, op)["gpu_total"] / GiB
        assert ours == pytest.approx(float(gb), rel=0.10), options


def test_stage_ordering():
    c = param_counts(ARCHS["qwen3-4b"])
    per_stage = [model_state_bytes(c["total"], c["largest_layer"], s, 8)["gpu_total"] for s in range(4)]
    assert per_stage == sorted(per_stage, reverse=True)
    one = model_state_bytes(c["total"], c["largest_layer"], 1, 1)["gpu_total"]
    assert one == pytest.approx(per_stage[0] - 2 * c["total"])  # ZeRO-1 on 1 GPU: no bf16 grad copy, else stage 0


@pytest.mark.parametrize("qwen", [False, True])
def test_activation_formula_matches_saved_tensors(qwen):
    """Count the bytes autograd saves in a small bf16 reward model (sdpa on CPU keeps no T x T matrix either)."""
    from transformers import AutoModelForSequenceClassification

    a = Arch(256, 3, 4, 2, 64, 704, 512, False, qk_norm=qwen)
    tokens = 512
    for ckpt in (False, True):
        cfg = hf_config(a, attn_implementation="sdpa")
        model = AutoModelForSequenceClassification.from_config(cfg).to(torch.bfloat16).train()
        if ckpt:
            enable_activation_checkpointing(model)
        saved: dict[int, int] = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(1, a.vocab, (1, tokens)), position_ids=torch.arange(tokens)[None],
                  use_cache=False)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        measured = sum(n for ptr, n in saved.items() if ptr not in weights)
        est = activation_bytes(a, tokens, ckpt)
        # with checkpointing the forward keeps only the layer inputs; one layer is rebuilt later, in backward
        forward_part = est["saved"] - (est["per_token_per_layer"] * tokens if ckpt else 0)
        assert forward_part == pytest.approx(measured, rel=0.05), ckpt


def plan_json(*args) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan", *map(str, args), "--json"]) == 0
    return json.loads(buf.getvalue())


def test_plan_final_8b_recipe_fits_64_gpus():
    r = plan_json("--config", RECIPES / "llama-3.1-8b.yaml", "--gpus", 8, "--nodes", 8, "--gpu-memory", 80,
                  "--dataset-pairs", 26_000_000, "--mean-pair-tokens", 2400)
    assert r["fits"] and r["setting"]["stage"] == 1 and r["setting"]["checkpointing"]
    assert r["time"]["steps_per_epoch"] == math.ceil(26_000_000 / 10240)
    assert r["time"]["hours"] > 0 and "assumed" in r["time"]["throughput_source"]
    # without gradient checkpointing a 32k-token micro-batch of an 8B model does not fit in 80 GiB
    assert r["activations_gib"]["no_ckpt"] > 80 > r["memory_gib"]["total"]


def test_plan_says_what_to_change(capsys):
    assert main(["plan", "--config", str(RECIPES / "qwen3-8b.yaml"), "--gpus", "1", "--gpu-memory", "80",
                 "--tokens-per-sec-per-gpu", "5000", "--dataset-pairs", "80000", "--mean-pair-tokens", "1500"]) == 0
    text = capsys.readouterr().out
    assert "WILL NOT FIT" in text and "offload the optimizer" in text and "more GPUs: 8" in text
    assert "5,000 tokens/s per GPU (measured" in text
    r = plan_json("--config", RECIPES / "qwen3-8b.yaml", "--gpus", 8, "--gpu-memory", 80, "--arch", "qwen3-0.6b")
    assert r["fits"] and r["params"]["total"] < 1e9


def test_lora_memory_counts_peft_trainable_params(tiny_llama_dir):
    """`btrm plan`'s LoRA parameter count equals what peft makes trainable on a real model; weights of every
    param, grads and Adam states of the trainable ones only."""
    pytest.importorskip("peft")
    from transformers import AutoConfig, AutoTokenizer

    from btrm import lora
    from btrm.config import LoraConfig
    from btrm.modeling import ensure_pad_token, load_reward_model
    from btrm.plan import arch_from_hf_config, lora_params

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ensure_pad_token(tok)
    cfg = LoraConfig(r=4)
    peft_model = lora.apply(load_reward_model(str(tiny_llama_dir), tok), cfg, str(tiny_llama_dir))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    a = arch_from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))
    assert lora_params(a, cfg.r, cfg.target_modules) == trainable
    p, t = 8_000_000_000, 20_000_000
    full = model_state_bytes(p, 10**9, 0, 1)
    lo = model_state_bytes(p, 10**9, 0, 1, trainable=t)
    assert lo["gpu_params"] == full["gpu_params"] == 2 * p and lo["gpu_total"] == pytest.approx(2 * p + 18 * t)
    q = model_state_bytes(p, 10**9, 2, 8, trainable=t, weight_bytes=0.5625)
    assert q["gpu_params"] == pytest.approx(0.5625 * p) and q["gpu_optimizer"] == pytest.approx(12 * t / 8)


# ----------------------------------------------------------------------------------------------------------------------
# Sequence parallelism (Ulysses)

TINY = Arch(hidden=8, layers=2, heads=4, kv_heads=2, head_dim=2, intermediate=16, vocab=10, tie_word_embeddings=False)


def test_activation_bytes_sp_hand_computed():
    """q = 8, kv = 4, H = 8, I = 16 bytes-per-unit by hand. SP = 1: per layer 2 (4H + 2q + 2kv + 4I) + 8H + 4 heads
    = 320, top 8H + 16 = 80, working 2 (2H + 2I) = 96. SP = 2 adds 2q = 16 per layer (the kernel's output at full row
    length) and 2 * 2 * (2q + 2kv) = 96 working bytes (all-to-all buffers); SP = 4 > kv_heads replicates kv heads:
    kv_sp = 4 * 2 = 8, + 4 (8 - 4) = 16 more per layer."""
    one = activation_bytes(TINY, 64, checkpointing=False)
    assert (one["saved"], one["total"]) == (64 * (2 * 320 + 80), 64 * (2 * 320 + 80 + 96))
    two = activation_bytes(TINY, 32, checkpointing=False, sp=2)  # the same 64-token row over 2 ranks
    assert (two["saved"], two["total"]) == (32 * (2 * 336 + 80), 32 * (2 * 336 + 80 + 192))
    four = activation_bytes(TINY, 16, checkpointing=False, sp=4)
    assert (four["saved"], four["total"]) == (16 * (2 * 352 + 80), 16 * (2 * 352 + 80 + 224))
    ckpt = activation_bytes(TINY, 32, checkpointing=True, sp=2)  # layer inputs 2H each, one layer rebuilt
    assert ckpt["saved"] == 32 * (2 * 2 * 8 + 336 + 80)
    assert activation_bytes(TINY, 64, False, sp=1) == activation_bytes(TINY, 64, False)


def _ulysses_saved_bytes(rank: int, a: Arch, tokens: int, init_file: str, out: dict) -> None:
    """One of 2 gloo ranks: the bytes autograd saves for this rank's half of a `tokens`-token row under DeepSpeed's
    UlyssesSPAttentionHF (sdpa inside: one unpacked row, so its causal mask is right)."""
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AutoModelForSequenceClassification

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, init_method=f"file://{init_file}",
                               rank=rank, world_size=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(hf_config(a, attn_implementation="sdpa"))
    model = model.to(torch.bfloat16).train()
    UlyssesSPAttentionHF.register_with_transformers(model_name_or_path=model, core_attn_implementation="sdpa",
                                                    sequence_parallel_size=2, micro_batch_size=1,
                                                    seq_length_is_variable=True)
    ids = torch.randint(1, a.vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    mine = slice(rank * tokens // 2, (rank + 1) * tokens // 2)
    out[rank] = saved_activation_bytes(model, ids[:, mine].clone(), torch.arange(tokens)[None, mine].clone())


def saved_activation_bytes(model, ids, positions) -> int:
    """Bytes of the tensors autograd saves in one forward, weights aside."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, position_ids=positions, use_cache=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in weights)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 1])  # 1 < SP: Ulysses replicates the kv head on both ranks
def test_sp_activation_formula_matches_ulysses_ranks(kv_heads, tmp_path):
    """2 ranks on gloo through the real DeepSpeed wrapper: each rank saves what the SP = 2 formula says for its
    half of the row (2%), clearly more than half the SP = 1 activations (the formula without its SP terms)."""
    import torch.multiprocessing as mp

    a = Arch(256, 3, 4, kv_heads, 64, 704, 512, False, qk_norm=True)
    tokens = 512
    out = mp.Manager().dict()
    mp.spawn(_ulysses_saved_bytes, args=(a, tokens, str(tmp_path / "rendezvous"), out), nprocs=2)
    assert out[0] == out[1]
    est = activation_bytes(a, tokens // 2, checkpointing=False, sp=2)["saved"]
    naive = activation_bytes(a, tokens // 2, checkpointing=False)["saved"]
    assert out[0] == pytest.approx(est, rel=0.02)
    assert out[0] > 1.03 * naive


LONG_RECIPE = RECIPES.parent / "long-context" / "qwen3-8b-64k.yaml"


def by_sp(r: dict) -> dict[int, dict]:
    return {e["sp"]: e for e in r["sequence_parallel"]["candidates"]}


def test_sp_recommendation_flips_at_the_right_memory():
    """Qwen3-8B, pairs of two 64K conversations, ZeRO-1 + checkpointing on 8 GPUs: SP 4's total is model states
    (unchanged by SP) + 32,768 tokens of SP = 4 activations + 2 GiB; at that memory SP 4 is recommended, just below
    it SP 8, and with room for SP 2's total, SP 2."""
    a = ARCHS["qwen3-8b"]
    c = param_counts(a)
    sp4 = (model_state_bytes(c["total"], c["largest_layer"], 1, 8)["gpu_total"]
           + activation_bytes(a, 32768, True, sp=4)["total"] + 2 * GiB) / GiB
    args = ("--config", RECIPES / "qwen3-8b.yaml", "--gpus", 8, "--data.max_length=65536")
    at = plan_json(*args, "--gpu-memory", sp4)
    assert by_sp(at)[4]["total_gib"] == pytest.approx(sp4)
    assert by_sp(at)[4]["tokens_per_rank"] == 32768 and by_sp(at)[8]["tokens_per_rank"] == 16384
    assert at["sequence_parallel"]["recommended"] == 4
    assert plan_json(*args, "--gpu-memory", sp4 - 0.01)["sequence_parallel"]["recommended"] == 8
    assert plan_json(*args, "--gpu-memory", by_sp(at)[2]["total_gib"])["sequence_parallel"]["recommended"] == 2
    assert plan_json(*args, "--gpu-memory", 40)["sequence_parallel"]["recommended"] is None


@pytest.mark.parametrize("arch,gpus,sp,why", [
    ("qwen3-8b", 6, 3, "the model's 32 attention heads do not divide by it"),
    ("llama-3.2-3b", 6, 3, "the model's 8 key/value heads neither divide by it nor divide it"),  # 24 heads, 8 kv heads
    ("qwen3-8b", 8, 3, "does not divide the 8 GPUs"),
])
def test_sp_that_does_not_divide_heads_is_refused(arch, gpus, sp, why, capsys):
    rc = main(["plan", "--config", str(RECIPES / "qwen3-8b.yaml"), "--arch", arch, "--gpus", str(gpus),
               "--gpu-memory", "80", f"--train.sequence_parallel_size={sp}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"train.sequence_parallel_size {sp}" in err and why in err
    if gpus % sp == 0:  # and the recommendation never offers it
        r = plan_json("--config", RECIPES / "qwen3-8b.yaml", "--arch", arch, "--gpus", gpus, "--gpu-memory", 80)
        assert why in by_sp(r)[sp]["error"] and "total_gib" not in by_sp(r)[sp]


def test_plan_states_sp_for_64k_and_128k_qwen3_8b_on_8x80(capsys):
    """The long-context recipe, as docs/recipes.md shows it: SP 4 is the smallest that fits 64K, SP 8 for 128K,
    each with its arithmetic; the recipe's own SP 8 at 16,384 tokens per GPU fits."""
    r = plan_json("--config", LONG_RECIPE, "--gpus", 8, "--gpu-memory", 80)
    assert r["fits"] and r["setting"]["sp"] == 8 and r["setting"]["max_tokens"] * 8 == 2 * 65536
    assert "note_max_tokens" not in r and "40,960 positions" in r["note_positions"]
    assert r["sequence_parallel"]["recommended"] == 4
    assert main(["plan", "--config", str(LONG_RECIPE), "--gpus", "8", "--gpu-memory", "80",
                 "--data.max_length=131072", "--data.max_tokens=32768"]) == 0
    text = capsys.readouterr().out
    assert "recipe: ZeRO-1 +ckpt, SP 8 @ 32,768 tok per rank (262,144 per row)" in text
    assert "2 x 131,072 = 262,144 tokens" in text
    assert re.search(r"^\s+4\s+65,536\s+657,552\s+40\.13 \+\s+52\.86 \+\s+0\.00 \+\s+2\.00 =\s+95\.0  over 80$", text,
                     re.M)
    assert ("recommended: SP 8, the smallest that fits (--train.sequence_parallel_size=8 --data.max_tokens=32768)"
            in text)


def test_plan_suggests_sp_when_a_long_row_does_not_fit():
    r = plan_json("--config", RECIPES / "qwen3-8b.yaml", "--gpus", 8, "--gpu-memory", 80,
                  "--data.max_length=65536", "--data.max_tokens=131072")
    assert not r["fits"]
    assert ("sequence parallelism: split each 131,072-token row over 4 GPUs (--train.sequence_parallel_size=4 "
            "--data.max_tokens=32768)") in r["suggestions"]


def test_recipes_md_shows_the_current_plan_output(capsys):
    """docs/recipes.md's 64K block is this command's output (up to its time section)."""
    doc = (RECIPES.parents[1] / "docs" / "recipes.md").read_text()
    cmd = "$ btrm plan --config configs/long-context/qwen3-8b-64k.yaml --gpus 8 --gpu-memory 80\n"
    shown = doc[doc.index(cmd) + len(cmd):].split("\n```")[0]
    assert main(["plan", "--config", str(LONG_RECIPE), "--gpus", "8", "--gpu-memory", "80"]) == 0
    assert shown == capsys.readouterr().out.split("\n\ntime\n")[0]
