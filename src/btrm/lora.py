"""LoRA / QLoRA reward models (peft, the optional extra `btrm[lora]`).

Training: adapters on the decoder's Linear layers named by `model.lora.target_modules`; the `score` head is a
peft "module to save", so it is trained in full and stored with the adapter (no hand-written modules_to_save, no
separate value-head file). Everything else is frozen. DeepSpeed sees one model with a few trainable parameters,
so ZeRO 0-3, packing and exact resume work unchanged.

Export (`export_state_dicts`, from the gathered full state dict on rank 0, so the same under every ZeRO stage):
  <checkpoint>/model.safetensors  merged weights W + (alpha / r) B A under the plain HF names: a
                                  *ForSequenceClassification model that loads with no peft installed
  <checkpoint>/adapter/           adapter_config.json + adapter_model.safetensors (+ tokenizer, btrm_meta.json), for
                                  continued training or `RewardModel.from_pretrained(<checkpoint>/adapter)`
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from btrm.errors import UserError

log = logging.getLogger("btrm")

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's name for the wrapped model


def enabled(cfg) -> bool:
    return cfg.r > 0


def check_available(cfg, device: torch.device) -> None:
    """Refuse clearly, before any model load, what cannot run here."""
    if cfg.load_in_4bit and device.type != "cuda":
        raise UserError(f"model.lora.load_in_4bit (QLoRA) needs a CUDA device: bitsandbytes 4-bit weights do not "
                        f"train on {device.type}; set model.lora.load_in_4bit=false for LoRA on the full-precision "
                        "base")
    if importlib.util.find_spec("peft") is None:
        raise UserError("model.lora needs peft: pip install 'btrm[lora]'")
    if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("model.lora.load_in_4bit needs bitsandbytes: pip install bitsandbytes")


def load_kwargs(cfg, dtype: torch.dtype) -> dict:
    """Extra from_pretrained kwargs: the 4-bit NF4 quantization of QLoRA (compute in the training dtype)."""
    if not cfg.load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)}


def apply(rm, cfg, base_name_or_path: str):
    """Inject adapters into `rm` in place (its `score` becomes a trained module to save); returns the PeftModel that
    owns the adapter config. `rm` itself stays the model to run (btrm.modeling.packed_rewards)."""
    from peft import LoraConfig, get_peft_model

    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        rm = prepare_model_for_kbit_training(rm, use_gradient_checkpointing=False)
    pc = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                    modules_to_save=["score"], bias="none", base_model_name_or_path=base_name_or_path)
    peft_model = get_peft_model(rm, pc)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%g on %s: %d trainable parameters of %d (%.3f%%), score head included", cfg.r,
             cfg.alpha, ",".join(cfg.target_modules), trainable, total, 100 * trainable / max(total, 1))
    return peft_model


def merged_state_dict(sd: dict[str, torch.Tensor], alpha: float, r: int) -> dict[str, torch.Tensor]:
    """Plain HF state dict of the merged model from the adapter model's full state dict (HF key names, peft layers
    inside): W + (alpha / r) B A per adapted Linear (computed in fp32), the trained score head as `score.weight`."""
    scale = alpha / r
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        if ".base_layer." in key:
            prefix, leaf = key.split(".base_layer.")
            if leaf == "weight":
                a, b = sd[f"{prefix}.lora_A.default.weight"], sd[f"{prefix}.lora_B.default.weight"]
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
            out[f"{prefix}.{leaf}"] = value
        elif ".modules_to_save.default." in key:
            out[key.replace(".modules_to_save.default.", ".")] = value
        else:
            out[key] = value
    return out


def export(peft_model, sd: dict[str, torch.Tensor], ckpt: Path, tokenizer, meta: dict) -> dict[str, torch.Tensor]:
    """Write `ckpt/adapter/` and return the merged state dict to save as the checkpoint's model (rank 0 only)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter_dir = ckpt / ADAPTER_DIR
    adapter_dir.mkdir(parents=True, exist_ok=True)
    pc = peft_model.peft_config["default"]
    pc.save_pretrained(str(adapter_dir))
    adapter_sd = get_peft_model_state_dict(peft_model, state_dict={PEFT_PREFIX + k: v for k, v in sd.items()})
    save_file({k: v.contiguous() for k, v in adapter_sd.items()}, str(adapter_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(str(adapter_dir))
    (adapter_dir / "btrm_meta.json").write_text(json.dumps(meta, indent=1))
    return merged_state_dict(sd, pc.lora_alpha, pc.r)


def meta(cfg, peft_model) -> dict:
    trainable, total = peft_model.get_nb_trainable_parameters()
    return {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": list(cfg.target_modules),
            "load_in_4bit": cfg.load_in_4bit, "trainable_params": trainable, "total_params": total,
            "adapter_dir": ADAPTER_DIR}


# ----------------------------------------------------------------------------------------------------------------------
# Scoring: an adapter directory on top of its base


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(path: str | Path, base: str | None, *, dtype: torch.dtype, attn_implementation: str,
                 trust_remote_code: bool = False):
    """(merged model, tokenizer) of an adapter dir on its base: `base`, else the adapter config's
    base_model_name_or_path. The base's score head is replaced by the adapter's trained one."""
    try:
        from peft import PeftModel
    except ImportError:
        raise UserError(f"{path} is a LoRA adapter: loading it needs peft (pip install 'btrm[lora]'), or load the "
                        "merged checkpoint one level up") from None
    from transformers import AutoTokenizer

    from btrm.modeling import load_reward_model

    base = base or json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path}/{ADAPTER_CONFIG} names no base model: pass base=...")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = load_reward_model(base, tokenizer, dtype=dtype, attn_implementation=attn_implementation,
                              trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return model, tokenizer
