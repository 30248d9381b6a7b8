"""Score conversations with a one-label *ForSequenceClassification checkpoint: ours or a released one.

    rm = RewardModel.from_pretrained("Skywork/Skywork-Reward-V2-Llama-3.1-8B")
    rm.score([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])

Conversations go through the trainer's render function (chat template, one leading BOS string stripped, then
tokenized), are packed into token-budget rows (one decoder pass per row, position_ids restarting per sequence), and
the reward is read at each sequence's last token. Conversations of one call that share a prompt (best-of-N, pairs)
have it encoded once (`btrm.data.prefix`); rewards are the same as without sharing. Results come back in input
order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from btrm import attention, calibration, lora
from btrm.data.dataset import cut_prompt_left
from btrm.data.packing import best_fit_decreasing, collate
from btrm.data.prefix import common_prefix_len, group_by_prefix, item_prefix, item_tokens
from btrm.errors import UserError
from btrm.modeling import check_pad_token, conversation_end_token, packed_rewards, resolve_dtype
from btrm.prefix_attention import sharing_mode
from btrm.render import render_ids, render_text, tokenize_texts

log = logging.getLogger(__name__)

META_FILE = "btrm_meta.json"  # written by the trainer next to config.json: {"chat_template_kwargs", "max_length"}
# Scoring length cap when none is given: min(max_position_embeddings, 16384), the length released reward models are
# evaluated at (Skywork-Reward-V2 card). The training length (btrm_meta.json) is kept as `train_max_length` and
# shown, never used as the cap: benchmarks hold conversations far longer than a short training run's.
DEFAULT_MAX_LENGTH = 16384
PROGRESS_MIN = 256  # show a progress bar from this many conversations on (progress=None)

Conversation = Sequence[dict]


def usable_length(config) -> int:
    """min(max_position_embeddings, 16384): the default scoring length of a model config."""
    return min(getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)


class OverlongError(ValueError, UserError):
    """One input is longer than `max_length` tokens (and the policy does not cut it)."""

    def __init__(self, index: int, length: int, max_length: int, why: str = ""):
        self.index, self.length, self.max_length, self.why = index, length, max_length, why
        super().__init__(f"input {index} has {length} tokens > max_length {max_length}"
                         + (f" ({why})" if why else "; pass truncation='left' to cut the prompt from the left"))


@dataclass
class PairScore:
    chosen: float
    rejected: float
    preferred: Literal["chosen", "rejected", "tie"]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_scores(chosen: Sequence[float], rejected: Sequence[float]) -> list[PairScore]:
    return [PairScore(c, r, "chosen" if c > r else "rejected" if r > c else "tie") for c, r in zip(chosen, rejected)]


def read_meta(path: str | Path) -> dict[str, Any]:
    """The trainer's `btrm_meta.json` of a local checkpoint dir ({} when absent or for a Hub id)."""
    f = Path(path) / META_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


class RewardModel:
    """A loaded reward model and its tokenizer. Build with `from_pretrained`."""

    def __init__(self, model, tokenizer, *, max_length: int, chat_template_kwargs: dict[str, Any] | None = None,
                 batch_tokens: int = 16384, truncation: Literal["error", "left"] = "error", share_prompt: bool = True):
        if truncation not in ("error", "left"):
            raise ValueError(f"truncation={truncation!r}: expected 'error' or 'left'")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.batch_tokens = int(batch_tokens)
        self.truncation = truncation
        self.device = next(model.parameters()).device
        # encode a prompt shared by several conversations of a call once (every backend of btrm.attention can; a
        # model loaded elsewhere with another attention implementation scores each conversation whole)
        self.share_prompt = bool(share_prompt) and sharing_mode(model) is not None
        # tokens the decoder ran on vs the tokens of the sequences scored, over this object's life
        self.token_counts = {"forward": 0, "sequences": 0}
        self.train_max_length: int | None = None  # the training run's max_length (btrm_meta.json), for display
        self.length_rule = "as given"  # where max_length came from, for display
        self.calibration: dict | None = None  # {"mean", "std", ...} for normalize=True (btrm.calibration)
        self.name = "this model"

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype = "auto", attn_implementation: str = "auto",
                        max_length: int | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                        trust_remote_code: bool = False, batch_tokens: int = 16384,
                        truncation: Literal["error", "left"] = "error", base: str | None = None,
                        share_prompt: bool = True) -> "RewardModel":
        """Load a one-label *ForSequenceClassification checkpoint (safetensors) and its tokenizer.

        chat_template_kwargs defaults to the checkpoint's `btrm_meta.json` when present; max_length to
        min(max_position_embeddings, 16384) (`usable_length`), whatever length the checkpoint was trained at
        (`train_max_length`). attn_implementation "auto" packs without padding on any device: the fastest backend
        of btrm.attention that runs on `device` in `dtype`. A LoRA adapter directory (adapter_config.json, e.g. a
        checkpoint's `adapter/`) loads on top of `base`, by default the base its adapter config names.
        share_prompt: encode a prompt that several conversations of one call share once.
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = str(path_or_hub_id)
        if not Path(path).is_dir() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
            raise FileNotFoundError(f"{path}: no such checkpoint directory (and not a Hub id 'owner/name')")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        meta = read_meta(path)
        if chat_template_kwargs is None:
            chat_template_kwargs = meta.get("chat_template_kwargs") or {}
        dtype = resolve_dtype(dtype, device)
        attn = attention.select(attn_implementation, device, dtype)
        if lora.is_adapter_dir(path):  # a LoRA adapter: merged onto its base on load (btrm.lora)
            model, tokenizer = lora.load_adapter(path, base, dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=trust_remote_code)
            model, config = model.to(device), model.config
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            # Like the model card (num_labels=1): a checkpoint with another head shape fails to load instead of
            # silently getting a fresh head.
            config.num_labels = 1
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=dtype, device_map={"": device},  # straight onto the device
                attn_implementation=attn, trust_remote_code=trust_remote_code, use_safetensors=True,
                output_loading_info=True)
            missing = list(info.get("missing_keys") or [])
            if missing:
                hint = " (no trained score head: is this a base model?)" if any("score" in k for k in missing) else ""
                raise ValueError(f"{path}: weights missing from the checkpoint{hint}: {sorted(missing)[:8]}")
        head = getattr(model, "score", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
            raise ValueError(f"{type(model).__name__} has no one-output `score` Linear head")
        rm = cls(model, tokenizer, max_length=max_length or usable_length(config),
                 chat_template_kwargs=chat_template_kwargs, batch_tokens=batch_tokens, truncation=truncation,
                 share_prompt=share_prompt)
        rm.train_max_length = meta.get("max_length")
        rm.calibration = calibration.load(meta, config)
        rm.name = path
        rm.length_rule = "as given" if max_length else (
            f"min(max_position_embeddings {getattr(config, 'max_position_embeddings', None)}, {DEFAULT_MAX_LENGTH})")
        rm._check_checkpoint(config)
        return rm

    def length_note(self) -> str:
        """'max_length 16384 tokens (min(max_position_embeddings 131072, 16384)); trained at 512 (btrm_meta.json)'."""
        trained = f"trained at {self.train_max_length}" if self.train_max_length else "training length not recorded"
        return f"max_length {self.max_length} tokens ({self.length_rule}); {trained} (btrm_meta.json)"

    def _check_checkpoint(self, config) -> None:
        # HF / SGLang / vLLM pool the rightmost non-pad token: a pad id that ends every rendered conversation would
        # make them read rewards one token early, so such a checkpoint cannot score consistently anywhere.
        last = conversation_end_token(self.tokenizer, self.chat_template_kwargs)
        if config.pad_token_id is None:
            log.warning("config has no pad_token_id: HF batched scoring cannot pool it (our packed path, SGLang "
                        "and one-at-a-time HF scoring are unaffected)")
        else:
            check_pad_token(config.pad_token_id, last)
        template = str(self.tokenizer.chat_template or "")
        if "strftime_now" in template and "date_string" not in self.chat_template_kwargs:
            log.warning("the chat template inserts today's date: rewards change with the calendar; pass "
                        "chat_template_kwargs={'date_string': ...} to fix it")

    # ------------------------------------------------------------------------------------------------------------------
    # Encoding

    def encode_each(self, conversations: Sequence[Conversation]) -> list[list[int] | OverlongError]:
        """Token ids per conversation (prompt cut from the left under truncation='left'), or the OverlongError.

        For streaming callers that skip bad rows; `encode` raises the first error instead.
        """
        texts = [render_text(self.tokenizer, c, self.chat_template_kwargs) for c in conversations]
        out: list[list[int] | OverlongError] = []
        for i, ids in enumerate(tokenize_texts(self.tokenizer, texts)):
            if len(ids) > self.max_length:
                try:
                    ids = self._truncate(i, ids, conversations[i])
                except OverlongError as e:
                    ids = e
            out.append(ids)
        return out

    def encode(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        out = self.encode_each(conversations)
        for x in out:
            if isinstance(x, OverlongError):
                raise x
        return out  # type: ignore[return-value]

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Already-templated strings (BOS stripped) -> ids; the tokenizer adds the BOS back, as SGLang and vLLM do.
        No truncation: over-long texts raise OverlongError."""
        ids = tokenize_texts(self.tokenizer, list(texts))
        for i, x in enumerate(ids):
            if len(x) > self.max_length:
                raise OverlongError(i, len(x), self.max_length, "texts are never truncated")
        return ids

    def _truncate(self, index: int, ids: list[int], conversation: Conversation) -> list[int]:
        """Cut prompt tokens from the left (after a leading BOS); the last turn, where the reward is read, stays."""
        if self.truncation == "error":
            raise OverlongError(index, len(ids), self.max_length)
        if len(conversation) < 2:
            raise OverlongError(index, len(ids), self.max_length, "no prompt turns to cut")
        try:
            return cut_prompt_left([ids], self._prompt_len(ids, conversation), len(ids) - self.max_length,
                                   self._bos_id())[0]
        except ValueError as e:
            raise OverlongError(index, len(ids), self.max_length, str(e)) from None

    def _bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token else None

    def _prompt_len(self, ids: list[int], conversation: Conversation) -> int:
        """Leading tokens of `ids` that render the prompt turns (all but the last)."""
        prompt = list(conversation)[:-1]
        return common_prefix_len(ids, render_ids(self.tokenizer, prompt, self.chat_template_kwargs)) if prompt else 0

    def cut_length(self, conversation: Conversation) -> int:
        """Tokens left once truncation='left' has cut every prompt token: the least this conversation can take."""
        ids = render_ids(self.tokenizer, conversation, self.chat_template_kwargs)
        prompt_len = self._prompt_len(ids, conversation)
        head = 1 if prompt_len and ids[:1] == [self._bos_id()] else 0
        return len(ids) - max(prompt_len - head, 0)

    # ------------------------------------------------------------------------------------------------------------------
    # Scoring

    def score(self, conversations: Sequence[Conversation], batch_tokens: int | None = None,
              progress: bool | None = None, normalize: bool = False) -> list[float]:
        """One reward per conversation (a list of {role, content} messages), in input order.

        normalize=True returns (r - mean) / std with the checkpoint's stored calibration (btrm.calibration)."""
        return self.score_ids(self.encode(conversations), batch_tokens, progress, normalize)

    def score_texts(self, texts: Sequence[str], batch_tokens: int | None = None,
                    progress: bool | None = None, normalize: bool = False) -> list[float]:
        """Rewards of already-templated strings with the BOS stripped (what SGLang's /classify receives)."""
        return self.score_ids(self.encode_texts(texts), batch_tokens, progress, normalize)

    def score_responses(self, prompt: Conversation, responses: Sequence[str | dict | Conversation],
                        batch_tokens: int | None = None, progress: bool | None = None) -> list[float]:
        """Best-of-N: rewards of several responses to one prompt (its messages), the prompt encoded once per row.

        A response is the assistant's text, one message, or a list of messages that follow the prompt.
        """
        def turns(r) -> list[dict]:
            if isinstance(r, str):
                return [{"role": "assistant", "content": r}]
            return [r] if isinstance(r, dict) else list(r)

        return self.score([[*prompt, *turns(r)] for r in responses], batch_tokens, progress)

    def score_pairs(self, chosen: Sequence[Conversation], rejected: Sequence[Conversation],
                    batch_tokens: int | None = None, progress: bool | None = None,
                    normalize: bool = False) -> list[PairScore]:
        """Rewards of preference pairs and which side the model prefers."""
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen vs {len(rejected)} rejected conversations")
        rewards = self.score(list(chosen) + list(rejected), batch_tokens, progress, normalize)
        return pair_scores(rewards[:len(chosen)], rewards[len(chosen):])

    def normalize(self, rewards: list[float]) -> list[float]:
        """(r - mean) / std with the stored calibration; a UserError when the checkpoint has none."""
        return calibration.normalize(rewards, self.calibration, self.name)

    @torch.inference_mode()
    def score_ids(self, seqs: Sequence[Sequence[int]], batch_tokens: int | None = None,
                  progress: bool | None = None, normalize: bool = False) -> list[float]:
        """Rewards of token id lists (read at each list's last id), in input order.

        Sequences sharing a prompt are grouped into items (the prompt once, then each continuation); items are
        packed by best-fit decreasing into rows of at most `batch_tokens` tokens (a longer sequence gets a row of
        its own), one decoder pass per row.
        """
        if normalize and not self.calibration:
            self.normalize([])  # fail before the forward passes
        if not seqs:
            return []
        sizes = [len(s) for s in seqs]
        for i, n in enumerate(sizes):
            if n == 0:
                raise ValueError(f"input {i} tokenizes to nothing")
        capacity = max(batch_tokens or self.batch_tokens, max(sizes))
        items = group_by_prefix(seqs, capacity) if self.share_prompt else [[i] for i in range(len(seqs))]
        groups = [[seqs[i] for i in item] for item in items]
        item_sizes = [item_tokens([len(s) for s in g], item_prefix(g)) for g in groups]
        show = len(seqs) > PROGRESS_MIN if progress is None else progress
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seqs), desc="scoring", unit="conv")
        out = [0.0] * len(seqs)
        for b in best_fit_decreasing(item_sizes, capacity):
            batch = collate([groups[j] for j in b], share=self.share_prompt)  # a plain row when nothing is shared
            rewards = packed_rewards(self.model, batch).tolist()
            for i, r in zip((i for j in b for i in items[j]), rewards):
                out[i] = r
            self.token_counts["forward"] += batch.num_tokens
            self.token_counts["sequences"] += sum(len(s) for j in b for s in groups[j])
            if show:
                bar.update(sum(len(items[j]) for j in b))
        if show:
            bar.close()
        return self.normalize(out) if normalize else out

    def token_report(self, since: dict[str, int] | None = None) -> str:
        """Tokens the decoder ran on vs the scored sequences' own, since `since` (a copy of `token_counts`)."""
        since = since or {}
        fwd, seq = (self.token_counts[k] - since.get(k, 0) for k in ("forward", "sequences"))
        return (f"decoder ran on {fwd:,} tokens for {seq:,} sequence tokens "
                f"({1 - fwd / max(seq, 1):.1%} saved by shared prompts)")

    def __repr__(self) -> str:
        return (f"RewardModel({type(self.model).__name__}, device={self.device}, max_length={self.max_length}, "
                f"chat_template_kwargs={self.chat_template_kwargs})")


def load_in_owned_process(path_or_hub_id: str | Path, **kwargs) -> RewardModel:
    """`RewardModel.from_pretrained` for a process btrm owns (`btrm score`, `btrm serve`, `btrm eval`).

    On CPU it also keeps freed memory in the process (btrm.cpu.retain_freed_memory): no page-faulting every
    batch's activations in again. That setting is process-wide, so plain library use does not get it.
    """
    from btrm.cpu import retain_freed_memory

    rm = RewardModel.from_pretrained(path_or_hub_id, **kwargs)
    retain_freed_memory(rm.device)
    return rm
