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

from btrm.data.packing import best_fit_decreasing
from btrm.data.prefix import common_prefix_len, group_by_prefix, item_prefix, item_tokens, pack_items
from btrm.modeling import check_pad_token, packed_rewards, resolve_attn_implementation, resolve_dtype
from btrm.prefix_attention import sharing_mode
from btrm.render import render_ids, render_text, tokenize_texts

log = logging.getLogger(__name__)

META_FILE = "btrm_meta.json"  # written by the trainer next to config.json: {"chat_template_kwargs", "max_length"}
DEFAULT_MAX_LENGTH = 16384  # the Skywork-Reward-V2 training length
PROGRESS_MIN = 256  # show a progress bar from this many conversations on (progress=None)
_PROBE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

Conversation = Sequence[dict]


class OverlongError(ValueError):
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
        # encode a prompt shared by several conversations of a call once (where the attention backend can)
        self.share_prompt = bool(share_prompt) and sharing_mode(model) is not None
        # tokens the decoder ran on vs the tokens of the sequences scored, over this object's life
        self.token_counts = {"forward": 0, "sequences": 0}

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype = "auto", attn_implementation: str = "auto",
                        max_length: int | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                        trust_remote_code: bool = False, batch_tokens: int = 16384,
                        truncation: Literal["error", "left"] = "error",
                        share_prompt: bool = True) -> "RewardModel":
        """Load a one-label *ForSequenceClassification checkpoint (safetensors) and its tokenizer.

        chat_template_kwargs / max_length default to the checkpoint's `btrm_meta.json` when present; max_length
        otherwise is min(max_position_embeddings, 16384). attn_implementation "auto" packs without padding on
        any device (segment SDPA on CPU, varlen / flash-attn on CUDA). share_prompt: encode a prompt that several
        conversations of one call share once (not with flash_attention_2, which cannot take the layout).
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = str(path_or_hub_id)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        meta = read_meta(path)
        if chat_template_kwargs is None:
            chat_template_kwargs = meta.get("chat_template_kwargs") or {}
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        # Like the model card (num_labels=1): a checkpoint with another head shape fails to load instead of
        # silently getting a fresh head.
        config.num_labels = 1
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=resolve_dtype(dtype, device), device_map={"": device},  # straight onto the device
            attn_implementation=resolve_attn_implementation(attn_implementation, device),
            trust_remote_code=trust_remote_code, use_safetensors=True, output_loading_info=True)
        missing = list(info.get("missing_keys") or [])
        if missing:
            hint = " (no trained score head: is this a base model?)" if any("score" in k for k in missing) else ""
            raise ValueError(f"{path}: weights missing from the checkpoint{hint}: {sorted(missing)[:8]}")
        head = getattr(model, "score", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
            raise ValueError(f"{type(model).__name__} has no one-output `score` Linear head")
        if max_length is None:
            max_length = meta.get("max_length") or min(
                getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
        rm = cls(model, tokenizer, max_length=max_length, chat_template_kwargs=chat_template_kwargs,
                 batch_tokens=batch_tokens, truncation=truncation, share_prompt=share_prompt)
        rm._check_checkpoint(config)
        return rm

    def _check_checkpoint(self, config) -> None:
        # HF / SGLang / vLLM pool the rightmost non-pad token: a pad id that ends every rendered conversation would
        # make them read rewards one token early, so such a checkpoint cannot score consistently anywhere.
        last = render_ids(self.tokenizer, _PROBE, self.chat_template_kwargs)[-1]
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
        prompt = list(conversation)[:-1]
        if not prompt:
            raise OverlongError(index, len(ids), self.max_length, "no prompt turns to cut")
        prompt_ids = render_ids(self.tokenizer, prompt, self.chat_template_kwargs)
        shared = common_prefix_len(ids, prompt_ids)
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token else None
        head = 1 if bos is not None and ids and ids[0] == bos else 0
        need = len(ids) - self.max_length
        if shared - head < need:
            raise OverlongError(index, len(ids), self.max_length,
                                f"the last turn alone needs {len(ids) - shared + head} tokens")
        return ids[:head] + ids[head + need:]

    # ------------------------------------------------------------------------------------------------------------------
    # Scoring

    def score(self, conversations: Sequence[Conversation], batch_tokens: int | None = None,
              progress: bool | None = None) -> list[float]:
        """One reward per conversation (a list of {role, content} messages), in input order."""
        return self.score_ids(self.encode(conversations), batch_tokens, progress)

    def score_texts(self, texts: Sequence[str], batch_tokens: int | None = None,
                    progress: bool | None = None) -> list[float]:
        """Rewards of already-templated strings with the BOS stripped (what SGLang's /classify receives)."""
        return self.score_ids(self.encode_texts(texts), batch_tokens, progress)

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
                    batch_tokens: int | None = None, progress: bool | None = None) -> list[PairScore]:
        """Rewards of preference pairs and which side the model prefers."""
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen vs {len(rejected)} rejected conversations")
        rewards = self.score(list(chosen) + list(rejected), batch_tokens, progress)
        return pair_scores(rewards[:len(chosen)], rewards[len(chosen):])

    @torch.inference_mode()
    def score_ids(self, seqs: Sequence[Sequence[int]], batch_tokens: int | None = None,
                  progress: bool | None = None) -> list[float]:
        """Rewards of token id lists (read at each list's last id), in input order.

        Sequences sharing a prompt are grouped into items (the prompt once, then each continuation); items are
        packed by best-fit decreasing into rows of at most `batch_tokens` tokens (a longer sequence gets a row of
        its own), one decoder pass per row.
        """
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
            batch = pack_items([groups[j] for j in b])
            if not batch.prefix.shared:  # nothing shared in this row: the plain packed path, which every backend takes
                batch.prefix = None
            rewards = packed_rewards(self.model, batch).tolist()
            for i, r in zip((i for j in b for i in items[j]), rewards):
                out[i] = r
            self.token_counts["forward"] += batch.num_tokens
            self.token_counts["sequences"] += sum(len(s) for j in b for s in groups[j])
            if show:
                bar.update(sum(len(items[j]) for j in b))
        if show:
            bar.close()
        return out

    def token_report(self, since: dict[str, int] | None = None) -> str:
        """Tokens the decoder ran on vs the scored sequences' own, since `since` (a copy of `token_counts`)."""
        since = since or {}
        fwd, seq = (self.token_counts[k] - since.get(k, 0) for k in ("forward", "sequences"))
        return (f"decoder ran on {fwd:,} tokens for {seq:,} sequence tokens "
                f"({1 - fwd / max(seq, 1):.1%} saved by shared prompts)")

    def __repr__(self) -> str:
        return (f"RewardModel({type(self.model).__name__}, device={self.device}, max_length={self.max_length}, "
                f"chat_template_kwargs={self.chat_template_kwargs})")
