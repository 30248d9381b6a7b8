"""The model card: a README.md in every exported checkpoint, generated from what the run wrote beside it.

Inputs, all in the checkpoint directory: config.json (architecture), btrm_config.yaml (the recipe), btrm_meta.json
(render settings, data report, held-out metrics, calibration) and btrm_eval.json (the benchmark table that
`btrm eval --update-card CKPT` stores). Rewriting the card from these files is idempotent, so whoever changes one
of them (the trainer, `btrm score --calibrate`, `btrm eval --update-card`) calls `write_card` again.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

CARD_FILE = "README.md"
EVAL_FILE = "btrm_eval.json"
MODEL_PATH_LINE = 'model_path = "path/to/this/checkpoint"  # this directory, or its Hub id once uploaded'


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def transformers_snippet(chat_template_kwargs: dict) -> str:
    """Scoring with plain transformers, in the render recipe btrm trains and scores with (btrm.render)."""
    return f'''import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

{MODEL_PATH_LINE}
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch.float32).eval()
chat_template_kwargs = {json.dumps(chat_template_kwargs)}  # what training rendered with


def reward(messages):
    """Reward of one conversation: a list of {{"role", "content"}} messages ending with the assistant's answer."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, **chat_template_kwargs)
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]  # the tokenizer adds it back: exactly one BOS
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0][0].item()


prompt = {{"role": "user", "content": "What is 2 + 2?"}}
print(reward([prompt, {{"role": "assistant", "content": "4"}}]),
      reward([prompt, {{"role": "assistant", "content": "5"}}]))
'''


def render_card(ckpt: str | Path) -> str:
    ckpt = Path(ckpt)
    config, meta, ev = _json(ckpt / "config.json"), _json(ckpt / "btrm_meta.json"), _json(ckpt / EVAL_FILE)
    recipe_file = ckpt / "btrm_config.yaml"
    recipe_text = recipe_file.read_text() if recipe_file.is_file() else ""
    recipe = yaml.safe_load(recipe_text) if recipe_text else {}
    arch = (config.get("architectures") or ["?"])[0]
    base = meta.get("base_model") or recipe.get("model", {}).get("name_or_path", "?")
    kwargs = meta.get("chat_template_kwargs") or {}
    lines = [f"# Reward model: {base} + Bradley-Terry head", "",
             f"A `{arch}` (`num_labels: 1`, `score = Linear(hidden, 1, bias=False)`) trained with btrm "
             f"{meta.get('btrm_version', '')} as a Bradley-Terry reward model. The reward of a conversation is the "
             "score head's output at its last token.", "",
             "| | |", "|---|---|",
             f"| base model | `{base}` |",
             f"| training step | {meta.get('step', '?')} |",
             f"| training max length | {meta.get('max_length', '?')} tokens |",
             f"| chat_template_kwargs | `{json.dumps(kwargs)}` |",
             f"| pad_token_id | {config.get('pad_token_id')} |"]
    if meta.get("lora"):
        lo = meta["lora"]
        lines.append(f"| LoRA | r {lo.get('r')}, alpha {lo.get('alpha')}, targets {lo.get('target_modules')}; "
                     f"merged into these weights, adapter in `{lo.get('adapter_dir', 'adapter')}/` |")
    lines += ["", "## Data", ""]
    lines += _data_section(meta.get("data"))
    lines += ["", "## Held-out metrics", ""]
    held = meta.get("heldout") or {}
    if held:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k[len('eval/'):]} | {v:.4f} |" for k, v in held.items()
                  if isinstance(v, (int, float)) and k.startswith("eval/")]
    else:
        lines.append("Not evaluated at this checkpoint (no held-out data, or a periodic save before the final eval).")
    lines += ["", "## Calibration", ""]
    cal = meta.get("calibration")
    if cal:
        lines += [f"Reward mean {cal['mean']:.6g}, std {cal['std']:.6g} over {cal.get('n', '?')} rewards "
                  f"({cal.get('source', '?')}); stored as `reward_mean` / `reward_std` in config.json. Raw "
                  "rewards are what every tool returns; `btrm score --normalize`, `btrm serve --normalize` and "
                  "`RewardModel.score(..., normalize=True)` return (r - mean) / std. transformers, SGLang and "
                  "vLLM never apply these keys."]
    else:
        lines.append("None stored yet: `btrm score --model CKPT --calibrate`.")
    lines += ["", "## Benchmarks", ""]
    if ev.get("table"):
        lines += [ev["table"].rstrip(), "", f"(`btrm eval`, max length {ev.get('max_length', '?')} tokens)"]
    else:
        lines.append("Not run yet: `btrm eval --model CKPT --suite all --update-card CKPT`.")
    kw_arg = f", chat_template_kwargs={kwargs!r}" if kwargs else ""
    lines += ["", "## Usage", "", "### transformers", "",
              "Render with the chat template, strip one leading BOS string, tokenize normally, read the logit:", "",
              "```python", transformers_snippet(kwargs).rstrip(), "```", "",
              "### btrm", "", "```python", "from btrm import RewardModel", "",
              f'rm = RewardModel.from_pretrained("path/to/this/checkpoint"{kw_arg})',
              'rm.score([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])',
              "```", "", "```bash",
              "btrm score --model path/to/this/checkpoint --input pairs.jsonl --output rewards.jsonl",
              "btrm serve --model path/to/this/checkpoint --port 8000", "```", "",
              "### SGLang / vLLM", "",
              "Send texts templated as above (BOS string stripped). SGLang: `python -m sglang.launch_server "
              "--model-path CKPT --is-embedding`, then `POST /classify {\"model\": ..., \"text\": [...]}`; the reward "
              "is `embedding[0]`. vLLM: `vllm serve CKPT --runner pooling`, then `POST /pooling`; its `/classify` "
              "applies a sigmoid to one-label models unless `\"use_activation\": false`.", ""]
    if recipe_text:
        lines += ["## Recipe", "", "<details><summary>btrm_config.yaml</summary>", "", "```yaml",
                  recipe_text.rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def _data_section(report: dict | None) -> list[str]:
    if not report:
        return ["Not recorded."]
    out = [f"{report.get('train_pairs', '?')} training pairs, {report.get('eval_pairs', '?')} held-out pairs.", "",
           "| split | source | rows read | pairs kept | skipped | over-long dropped | over-long truncated |",
           "|---|---|---|---|---|---|---|"]
    for split in ("train", "eval"):
        r = report.get(split) or {}
        for name in sorted(r.get("read", {})):
            skipped = r.get("skipped", {}).get(name, {})
            skipped_text = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "0"
            cells = [split, name, r["read"][name], r.get("kept", {}).get(name, "?"), skipped_text,
                     r.get("overlong_dropped", {}).get(name, 0), r.get("overlong_truncated", {}).get(name, 0)]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def write_card(ckpt: str | Path) -> Path:
    path = Path(ckpt) / CARD_FILE
    path.write_text(render_card(ckpt), encoding="utf-8")
    return path


def store_eval(ckpt: str | Path, table: str, results: dict, max_length: int) -> Path:
    """Keep the benchmark table of `btrm eval --update-card` beside the checkpoint and rewrite its card."""
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file():
        from btrm.errors import UserError

        raise UserError(f"--update-card {ckpt}: not a local checkpoint directory (no config.json)")
    (ckpt / EVAL_FILE).write_text(json.dumps({"table": table, "results": results, "max_length": max_length},
                                             indent=1))
    return write_card(ckpt)
