"""Typed configuration: one dataclass per concern, nested in `Config`.

Load order (later wins): dataclass defaults < YAML file < `--section.key=value` overrides. Unknown keys and
ill-typed values are errors naming the dotted path. `to_dict` / `dump_yaml` round-trip to an equal object.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from btrm.attention import CHOICES as ATTN_CHOICES


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted path."""


def sp_heads_error(sp: int, heads: int, kv_heads: int) -> str | None:
    """Why `sp` ranks cannot split a model's attention heads (Ulysses), else None: each rank takes heads / SP query
    heads; key/value heads must divide by SP, or SP by them (DeepSpeed then repeats each KV head on SP / KV ranks).
    One rule for the trainer's check and the planner."""
    if heads % sp:
        return f"the model's {heads} attention heads do not divide by it (each rank takes heads / SP)"
    if kv_heads % sp and sp % kv_heads:
        return f"the model's {kv_heads} key/value heads neither divide by it nor divide it"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class LoraConfig:
    """LoRA adapters on the decoder's linear layers (btrm.lora; needs `pip install btrm[lora]`). The score head is
    always trained in full. Checkpoints hold the merged plain model plus the adapter in `adapter/`."""
    r: int = 0
    """Adapter rank; 0 = no LoRA (full fine-tuning)."""
    alpha: float = 16.0
    """Scaling numerator: updates are scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"])
    """Names of the decoder's Linear modules that get adapters."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes; CUDA only, ZeRO 0-2)."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Base model: a Hub id or a local directory (Llama-3.x / Qwen3 or any decoder with *ForSequenceClassification)."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Training precision. auto = bf16 on CUDA, fp32 on CPU."""
    attn_implementation: Literal[ATTN_CHOICES] = "auto"
    """Packed attention, one of btrm.attention.BACKENDS. auto = the fastest that runs on the device in `dtype`:
    flash_attention_2 if installed, else torch's varlen kernel (CUDA, bf16), else `segment` (per-segment sdpa,
    cost sum(s_i^2), not T^2; any device and dtype). sdpa/eager use transformers' dense mask from position_ids."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (saves memory at ~30% more compute)."""
    pad_token: str | None = None
    """Pad token to set when the tokenizer has none. None = pick a reserved/unused special token automatically."""
    trust_remote_code: bool = False
    """Run model code from the checkpoint repo. Off unless you trust it."""
    head_init_std: float | None = None
    """Std of the new score head; None = the base config's initializer_range."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA adapters (off unless lora.r > 0)."""


@dataclass
class SourceConfig:
    path: str = ""
    """Local file / directory (json, jsonl, parquet, arrow) or a Hugging Face Hub dataset id."""
    name: str = ""
    """Name used in reports and per-source metrics (default: file stem or Hub id)."""
    weight: float = 1.0
    """Sampling weight: the source contributes round(weight * rows) pairs per epoch (weights < 1 subsample,
    > 1 repeat)."""
    split: str = "train"
    """Split for Hub ids and dataset directories."""
    max_rows: int | None = None
    """Read at most this many raw rows (None = all)."""
    swap: bool = False
    """Exchange chosen and rejected (e.g. recycled pairs of the Skywork 40M recipe)."""
    format: Literal["auto", "messages", "strings", "prompt_messages", "group"] = "auto"
    """Row layout: messages = chosen/rejected message lists; strings = prompt/chosen/rejected strings;
    prompt_messages = prompt message list + chosen/rejected strings; group = prompt + K >= 2 responses + scores
    or ranking (docs/design.md). auto detects per row (a `responses` column makes a group row)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column renames, ours -> theirs, e.g. {chosen: response_a}. Our names: prompt, chosen, rejected, margin,
    source, category; for groups responses, scores, ranking. `a[].b` reads field b of each element of list
    column a, e.g. {responses: "completions[].response"}."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Training sources."""
    eval_sources: list[SourceConfig] = field(default_factory=list)
    """Held-out sources; when empty, `eval_fraction` of the training pairs is held out by a stable hash."""
    eval_fraction: float = 0.0
    """Share of pairs held out for eval by hash of the pair content (0 disables); never seen in training."""
    max_length: int = 16384
    """Longest rendered conversation (tokens); longer pairs follow `overlong`."""
    max_tokens: int = 16384
    """Token budget of one packed micro-batch per rank (one row of the packed forward). A pair needs
    len(chosen) + len(rejected) <= max_tokens, else it is over-long. With train.sequence_parallel_size = SP, a row
    is split over SP ranks, so row and pair budget are max_tokens x SP."""
    overlong: Literal["drop", "truncate_prompt_left"] = "drop"
    """drop = skip over-long pairs (counted); truncate_prompt_left = cut prompt tokens from the left. A response's
    end is never cut."""
    strict: bool = False
    """Raise on the first bad row (naming file, row and field) instead of skipping and counting."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra kwargs for apply_chat_template, e.g. {date_string: "26 Jul 2024"} for Llama-3.2. Saved in checkpoints."""
    num_proc: int = 1
    """Processes for tokenization (datasets.map)."""
    cache_dir: str = ".cache/btrm"
    """Tokenized-data cache, keyed by tokenizer, template, files and settings (`btrm data prepare` writes it)."""
    cache_scope: Literal["node", "shared"] = "node"
    """Who prepares a missing cache before training: node = the first local rank of each node (node-local disks;
    nodes sharing a file system still build once, under the cache's file lock); shared = global rank 0 only, the
    others wait for its files (for a shared file system without flock)."""
    share_prompt: bool = True
    """Pack the prompt a pair's chosen and rejected (a group's K responses) share once, each response continuing
    from it: fewer tokens, the same rewards, loss and gradients, with every attention backend. The token budget
    `max_tokens` counts the prompt once; which pairs are over-long does not change."""
    shuffle: bool = True
    """Shuffle pairs each epoch (seeded)."""


@dataclass
class OptimConfig:
    lr: float = 3e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (per step, times lr); norms and other 1-D parameters get none."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam (beta1, beta2): decay rates of the first and second moment estimates."""
    eps: float = 1e-8
    """Adam epsilon, added to the root of the second moment."""
    name: Literal["adamw", "sgd"] = "adamw"
    """adamw (DeepSpeed fused / CPU Adam where available) or plain sgd (used by equivalence tests)."""
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warmup: constant, linear to min_lr_ratio*lr, or cosine to min_lr_ratio*lr."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from lr/warmup_steps to lr (0 = use warmup_ratio)."""
    warmup_ratio: float = 0.0
    """Warmup as a share of total steps (used when warmup_steps is 0)."""
    min_lr_ratio: float = 0.0
    """Floor of linear / cosine decay, as a share of lr (reached at the last step)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""


@dataclass
class LossConfig:
    kind: str = "bt_pairs"
    """Objective, a name in btrm.loss.OBJECTIVES: bt_pairs = Bradley-Terry, -logsigmoid(r_w - r_l), over every
    ordered pair of responses an item orders (a pair: its one comparison; `bt` is its old name); plackett_luce =
    the listwise likelihood of a group's ranking (ties: docs/design.md). Both equal plain BT on pairs."""
    margin: bool = False
    """Use the per-pair `margin` column: -logsigmoid(r_c - r_r - margin), for each comparison of the item."""
    center_coef: float = 0.0
    """Reward centering: + coef * (r_c + r_r)^2 per pair, i.e. per comparison (0 disables)."""
    min_score_gap: float = 0.0
    """A rated group compares two responses only when their scores differ by more than this (0: every untied
    pair). Groups given as a ranking, and pairs, compare every ordered pair."""


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    """Run directory: checkpoints (checkpoint-<step>/, each with its config) and metrics.jsonl."""
    global_batch_pairs: int = 256
    """Pairs per optimizer step over all ranks."""
    epochs: float = 1.0
    """Passes over the training pairs (fractions allowed); steps = ceil(epochs * pairs / global_batch_pairs)."""
    max_steps: int | None = None
    """Stop after this many steps (overrides epochs when set)."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    seed: int = 42
    """Seeds torch, the pair order of each epoch, the subsample of a source with a fractional weight, and the
    score-head init."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective and its options."""
    sequence_parallel_size: int = 1
    """Ranks that split one packed row along the sequence (DeepSpeed Ulysses, btrm.sequence_parallel); the world
    is split into world / SP data-parallel groups of SP consecutive ranks. Must divide the world size; the model's
    attention heads must divide by it, its key/value heads divide by it or it by them. Needs attention segment,
    varlen or flash_attention_2."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep this many most recent step checkpoints (the final one is always kept)."""
    resume: str = "auto"
    """auto = latest complete checkpoint in output_dir if any; none; or a checkpoint path."""
    save_final: bool = True
    """Save a checkpoint at the end of training (unless the last step was just saved)."""


@dataclass
class LoggingConfig:
    every: int = 1
    """Log metrics every N steps."""
    wandb: bool = True
    """Log to Weights & Biases (offline automatically when no API key is set)."""
    project: str = "btrm"
    """Weights & Biases project."""
    run_name: str | None = None
    """Weights & Biases run name (None = W&B picks one)."""
    tags: list[str] = field(default_factory=list)
    """Weights & Biases run tags."""
    progress: bool = True
    """Rank-0 progress bar."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Optimizer states on CPU (ZeRO >= 1)."""
    offload_param: bool = False
    """Parameters on CPU (ZeRO-3)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed keys merged last (escape hatch; nested dicts merge)."""
    timeout_s: float = 600.0
    """Timeout of every collective (s; DeepSpeed's default is 10 min): a rank that waits longer fails. Data are
    prepared before the process group exists, so tokenizing needs no headroom here."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self) -> "Config":
        from btrm.loss import OBJECTIVES  # the objective table (imports torch)

        checks = [
            ("model.name_or_path", bool(self.model.name_or_path), "must be set"),
            ("train.global_batch_pairs", self.train.global_batch_pairs > 0, "must be > 0"),
            ("train.sequence_parallel_size", self.train.sequence_parallel_size >= 1, "must be >= 1"),
            ("optim.lr", self.optim.lr >= 0, "must be >= 0"),
            ("data.max_length", self.data.max_length > 1, "must be > 1"),
            ("data.max_tokens", self.data.max_tokens >= 2, "must be >= 2"),
            ("data.eval_fraction", 0.0 <= self.data.eval_fraction < 1.0, "must be in [0, 1)"),
            ("deepspeed.zero_stage", self.deepspeed.zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
            ("deepspeed.offload_param", not self.deepspeed.offload_param or self.deepspeed.zero_stage == 3,
             "needs deepspeed.zero_stage=3"),
            ("train.epochs", self.train.epochs > 0 or self.train.max_steps, "must be > 0 unless max_steps is set"),
            ("checkpoint.keep_last", self.checkpoint.keep_last >= 1, "must be >= 1"),
            ("train.loss.kind", self.train.loss.kind in OBJECTIVES, f"must be one of {sorted(OBJECTIVES)}"),
            ("train.loss.min_score_gap", self.train.loss.min_score_gap >= 0, "must be >= 0"),
            ("model.lora.r", self.model.lora.r >= 0, "must be >= 0"),
            ("model.lora.load_in_4bit", not self.model.lora.load_in_4bit or self.model.lora.r > 0,
             "needs model.lora.r > 0"),
            ("model.lora.load_in_4bit", not self.model.lora.load_in_4bit or self.deepspeed.zero_stage < 3,
             "is not supported with deepspeed.zero_stage=3 (4-bit weights cannot be partitioned)"),
        ]
        for i, s in enumerate(self.data.sources + self.data.eval_sources):
            checks.append((f"data.sources[{i}].path", bool(s.path), "must be set"))
            checks.append((f"data.sources[{i}].weight", s.weight > 0, "must be > 0"))
        if not self.data.sources:
            checks.append(("data.sources", False, "needs at least one source"))
        for path, ok, why in checks:
            if not ok:
                raise ConfigError(f"{path} {why}")
        return self


# ----------------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert `value` to annotation `tp`; raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls, data: dict, path: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (valid: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def field_choices(cls, name: str) -> list:
    """The values a Literal-typed field of config dataclass `cls` allows (for CLI choices)."""
    return list(typing.get_args(typing.get_type_hints(cls)[name]))


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------------------------------
# YAML + dotted overrides


def _parse_scalar(text: str) -> Any:
    """YAML syntax for values (lists, dicts, bools, null). '3e-6' stays a string here; float fields convert it."""
    return yaml.safe_load(text) if text != "" else ""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[:i + 1])}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """['--optim.lr=3e-6', '--train.max_steps', '10'] -> nested dict."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} needs a value")
            i += 1
            text = args[i]
        _set_dotted(tree, key.replace("-", "_"), _parse_scalar(text))
        i += 1
    return tree


def merge_dicts(base: dict, top: dict) -> dict:
    """A new dict: `top` over `base`, nested mappings merged key by key (the inputs are not modified or shared)."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                validate: bool = True) -> Config:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded
    if overrides:
        tree = merge_dicts(tree, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    try:
        cfg = from_dict(Config, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return cfg.validate() if validate else cfg


def dump_yaml(cfg: Config, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
