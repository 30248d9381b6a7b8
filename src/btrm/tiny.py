"""Tiny stand-ins for the real bases, built offline: tokenizers, random-init models and a learnable preference set.

Tests and smoke runs need the *formats* of Llama-3.1/3.2 and Qwen3 (special tokens, chat templates, BOS
behaviour, config ids) without downloading gigabytes. Everything here is deterministic and built in seconds:

- ``build_tokenizer(family)``: a byte-level BPE trained on a small built-in corpus, with the family's
  special tokens, post-processor and chat template (same output as the real templates for plain
  system/user/assistant conversations without tools).
- ``build_tiny_model(family, out_dir)``: a random-init ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` saved
  with its tokenizer, loadable by ``AutoModelForSequenceClassification``.
- ``make_preference_rows(n)``: pairs in the Skywork-Reward-Preference-80K schema whose label a 2-layer
  model learns in a few hundred steps and that response length cannot predict.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

# Bumped whenever the tokenizer, the tiny models or the synthetic pairs change, so `tiny:` and `synthetic:`
# references materialised in a cache by an older btrm are rebuilt instead of silently reused.
BUILTIN_VERSION = 2

FAMILIES = ("llama3", "llama3.2", "qwen3")

# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------

# Pre-tokenizer regexes of the real tokenizer.json files: Llama-3 groups digits by up to 3, Qwen splits each.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# In the real Llama-3 order (ids 128000.. there; here they follow the BPE vocab, as there).
_LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 8)]

# Qwen3: the first three are special; the tool/think tags are added tokens with special=False, as in the real one.
_QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_QWEN3_ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]

# The Llama-3.1 template restricted to messages without tools; the 3.2 one differs only in the date default.
_LLAMA_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
__DATE_DEFAULT__
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
_LLAMA31_DATE = """    {%- set date_string = "26 Jul 2024" %}"""
# Llama-3.2: today's date, so the rendered text (and the reward) depends on the calendar.
_LLAMA32_DATE = """    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}"""

# The Qwen3 template without tools: the final assistant turn after the last user turn gets an empty think block.
_QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if not ns.found and message.role == "user" %}
        {%- set ns.found = true %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

_BPE_VOCAB = 1536  # a cap: the small corpus runs out of merges first (~1.1K incl. 256 bytes); specials on top

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A reward model reads a conversation and returns one number.
Higher numbers mean the answer is better. People compare two answers to the same question and say which one
they prefer; the model learns from many such pairs. It should not prefer an answer just because it is longer.
You are a helpful assistant. Please answer the question below. Thank you for your help, I really appreciate it.
Could you explain how this works? Sure, here is a short explanation. Of course, I would be glad to help.
What is the capital of France? The capital of France is Paris. What is two plus three? Two plus three is five.
Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec 2023 2024 2025 2026 01 02 03 04 05 06 07 08 09 10 11 12 31
system user assistant tool ipython
The weather today is sunny and warm, with a light breeze from the west. Rain is expected later this week.
Water boils at one hundred degrees Celsius at sea level. The Earth goes around the Sun once every year.
Cats and dogs are popular pets. Many people enjoy reading books, cooking dinner, and walking in the park.
The train leaves the station at nine in the morning and arrives in the city before noon.
Learning a new language takes time, patience, and practice. Music, art, and science are all worth studying.
"Hello," she said. "How are you?" He replied, "I'm fine, thanks. And you?" They're here; we've seen it.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 42 50 99 100 123 256 1000.
Symbols: + - * / = ( ) [ ] { } < > : ; , . ! ? ' " # @ % & _ |
def main():
    print("hello world")
    return 0
THIS LINE IS WRITTEN IN CAPITAL LETTERS. SOME PEOPLE SHOUT WHEN THEY WRITE.
"""

# Text as the templates lay it out, so "\n\n" and the role names become single tokens as in the real vocabularies.
_CHAT_SNIPPETS = (
    "system\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    "user\n\nHello there, can you help me?",
    "assistant\n\nHi! How can I help you today?",
    "user\nWhat time is it?\nassistant\nIt is noon.\n",
)


def _training_corpus() -> list[str]:
    # The data set's own words go in too, so its text tokenizes into whole words rather than bytes.
    phrases = [p for kind in _WORDS.values() for p in kind]
    words = sorted({w for p in phrases for w in p.split()})
    return _CORPUS.splitlines() + list(_CHAT_SNIPPETS) + [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]


def build_tokenizer(family: str):
    """A small byte-level BPE tokenizer in the format of ``family`` ("llama3", "llama3.2" or "qwen3").

    Deterministic; trains in well under a second. Returns a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    llama = family.startswith("llama")

    tok = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=llama))
    if not llama:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if llama else _QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=_BPE_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)

    # Special tokens after the BPE vocab, as in the real files (Llama-3: 128000+, Qwen3: 151643+).
    if llama:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _LLAMA3_SPECIALS])
        bos = "<|begin_of_text|>"
        bos_id = tok.token_to_id(bos)
        # Like the real Llama-3: tokenizing with add_special_tokens=True prepends exactly one BOS.
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
                ),
            ]
        )
        date_default = _LLAMA31_DATE if family == "llama3" else _LLAMA32_DATE
        template = _LLAMA_TEMPLATE.replace("__DATE_DEFAULT__", date_default)
        special = dict(bos_token=bos, eos_token="<|eot_id|>")  # no pad token, like the real one
    else:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN3_SPECIALS])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _QWEN3_ADDED])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds nothing: Qwen3 has no BOS
        template = _QWEN3_TEMPLATE
        special = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=template,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        **special,
    )


# ----------------------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------------------


def build_tiny_model(
    family: str,
    out_dir,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """Save a random-init base causal LM of ``family`` plus its tokenizer to ``out_dir`` (fp32 safetensors).

    Config ids follow the real Instruct checkpoints: Llama has bos = <|begin_of_text|>, eos = [<|end_of_text|>,
    <|eom_id|>, <|eot_id|>] and no pad; Qwen3 has bos_token_id = <|endoftext|> (although its tokenizer has no
    BOS), eos = <|im_end|>, pad = <|endoftext|>. Same seed, same weights.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer(family)
    ids = tokenizer.convert_tokens_to_ids
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=131072 if family.startswith("llama") else 40960,
        rms_norm_eps=1e-5 if family.startswith("llama") else 1e-6,
        dtype="float32",
    )
    if family.startswith("llama"):
        config = LlamaConfig(
            **common,
            bos_token_id=ids("<|begin_of_text|>"),
            eos_token_id=[ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")],
            pad_token_id=None,
            tie_word_embeddings=family == "llama3.2",  # 3.2 1B/3B tie, 3.1 8B does not
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0 if family == "llama3.2" else 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
        model_cls = LlamaForCausalLM
    elif family == "qwen3":
        config = Qwen3Config(
            **common,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=True,  # Qwen3 0.6B-4B tie
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
        model_cls = Qwen3ForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Synthetic preference data
# ----------------------------------------------------------------------------------------------------------
# Three kinds, one `source` each; the chosen answer is right for a reason that can be read off the text:
#   tiny-case         follows "Reply in UPPERCASE/lowercase" (needs prompt x response: an XOR, not a word list)
#   tiny-temperature  says "hot"/"cold" correctly for a thing (a small fact table joined with the answer)
#   tiny-tone         polite rather than rude (a bag-of-words signal)
# Chosen and rejected bodies are sampled independently from the same pools, so length says nothing about the
# label (longer-wins ~0.46 on the quickstart's held-out pairs). Measured with the quickstart recipes (default tiny
# models, AdamW lr 1e-3 cosine, 32 pairs a step, fp32 CPU, 444 steps): held-out pair accuracy 1.000 at the end
# for train.seed 0-9 on Llama and on Qwen3. The fact kind is the slow one: found between step 50 and 300
# depending on the seed (with 222 steps Llama seed 1 ended at 0.87). Harder kinds tried (single-digit sums, a
# 14-entry colour table) stayed near chance in that budget.

_WORDS = {
    "topics": [
        "the ocean", "coffee", "the moon", "trains", "gardening", "chess", "rain", "bicycles", "music",
        "the desert", "bread", "winter", "rivers", "libraries", "owls", "volcanoes", "tea", "mountains",
    ],
    "adjectives": [
        "calm", "old", "bright", "useful", "quiet", "large", "strange", "simple", "famous", "gentle",
        "cold", "warm", "deep", "popular", "ancient", "lovely",
    ],
    "case_templates": [
        "{t} is {a}.", "{t} can be {a} and {b}.", "many people say {t} is {a}.", "i think {t} is {a} today.",
        "{t} feels {a}, sometimes {b}.", "honestly, {t} is {a}.",
    ],
    "tasks": [
        "the homework", "a cover letter", "this recipe", "the travel plans", "a birthday speech",
        "the budget", "a bug in the code", "the resume", "this email",
    ],
    "polite": [
        "Of course, I would be glad to help with {x}.", "Sure, happy to help with {x}.",
        "Thanks for asking! Let us look at {x} together.", "Certainly, here is some help with {x}.",
    ],
    "rude": [
        "Ugh, figure out {x} yourself.", "No way, {x} is your problem, not mine.",
        "Stop bothering me about {x}, seriously.", "Whatever, {x} is boring and so are you.",
    ],
    "filler": [
        "First, read it once more.", "Start with the main idea.", "Then check each step.",
        "Keep it short and clear.", "Write down what you need.", "Take a break if it gets hard.",
    ],
    # Two temperature words per answer give a dense cue on the answer side. With one word the (thing x answer)
    # table was found after 75 to >200 steps depending on the seed; with two, Llama needs 50-175, Qwen3 25-100.
    "hot_things": ["fire", "the sun", "fresh coffee", "lava", "a stove"],
    "cold_things": ["ice", "snow", "a glacier", "ice cream", "the fridge"],
    "hot_words": ["hot", "warm", "burning", "scorching"],
    "cold_words": ["cold", "icy", "freezing", "chilly"],
    "temperature_templates": ["{x} is {w} and {v}.", "I would say {x} is {w}, even {v}.", "{x} feels {w}, really {v}.",
                              "Usually {x} is {w} and {v}.", "Well, {x} is {w}. Very {v}."],
}


def build_tiny_reward_model(out_dir, *, score_std: float = 1.0, **shape) -> Path:
    """A random-init one-label reward model (`score` head N(0, score_std), seed 0) saved to ``out_dir``: a Llama-3
    tiny base of ``shape`` (build_tiny_model's keywords) with a pad token that never ends a conversation. The
    benchmark scripts score with it; a unit-scale head spreads the rewards so that orderings are not all ties."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from btrm.modeling import ensure_pad_token

    out_dir = Path(out_dir)
    base = build_tiny_model("llama3", out_dir.with_name(out_dir.name + "-base"), **shape)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=ensure_pad_token(tok))
    with torch.no_grad():
        model.score.weight.normal_(0.0, score_std, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def load_tiny_score_model(hidden_size: int, num_layers: int, attn_implementation: str):
    """A random-init Llama-3 tiny one-label sequence classifier of width ``hidden_size`` (8 heads, 4 KV heads, MLP
    4x wide), loaded in memory with ``attn_implementation``: what the CPU attention benchmarks time."""
    import tempfile

    from transformers import AutoModelForSequenceClassification

    with tempfile.TemporaryDirectory() as d:
        build_tiny_model("llama3", d, hidden_size=hidden_size, num_layers=num_layers, num_heads=8, num_kv_heads=4,
                         intermediate_size=4 * hidden_size)
        return AutoModelForSequenceClassification.from_pretrained(d, num_labels=1,
                                                                  attn_implementation=attn_implementation)


def _conv(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _case_pair(rng: random.Random) -> tuple[str, str, str]:
    upper = rng.random() < 0.5
    topic = rng.choice(_WORDS["topics"])
    user = f"Reply in {'UPPERCASE' if upper else 'lowercase'}. Tell me about {topic}."

    def body() -> str:
        a, b = rng.sample(_WORDS["adjectives"], 2)
        return rng.choice(_WORDS["case_templates"]).format(t=topic, a=a, b=b)

    good, bad = body(), body()
    return user, (good.upper() if upper else good.lower()), (bad.lower() if upper else bad.upper())


def _temperature_pair(rng: random.Random) -> tuple[str, str, str]:
    hot = rng.random() < 0.5
    thing = rng.choice(_WORDS["hot_things"] if hot else _WORDS["cold_things"])
    user = rng.choice(["Is {x} hot or cold?", "Would {x} feel hot or cold?", "Tell me, is {x} hot or cold?"])

    def body(words: list[str]) -> str:
        w, v = rng.sample(words, 2)
        return _capitalize(rng.choice(_WORDS["temperature_templates"]).format(x=thing, w=w, v=v))

    right, wrong = (_WORDS["hot_words"], _WORDS["cold_words"]) if hot else (_WORDS["cold_words"], _WORDS["hot_words"])
    return user.format(x=thing), body(right), body(wrong)


def _tone_pair(rng: random.Random) -> tuple[str, str, str]:
    task = rng.choice(_WORDS["tasks"])
    user = rng.choice(["Can you help me with {x}?", "Please help me with {x}.", "I need help with {x}."]).format(x=task)

    def body(openers: list[str]) -> str:
        extra = rng.sample(_WORDS["filler"], rng.randint(0, 2))
        return " ".join([_capitalize(rng.choice(openers).format(x=task)), *extra])

    return user, body(_WORDS["polite"]), body(_WORDS["rude"])


_KINDS = {"tiny-case": _case_pair, "tiny-temperature": _temperature_pair, "tiny-tone": _tone_pair}


def make_preference_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"chosen": [user, assistant], "rejected": [user, assistant], "source": kind}``.

    Kinds rotate (case, temperature, tone) so every prefix is balanced; the same (n, seed) gives the same rows, and
    rows of a longer list extend a shorter one.
    """
    rng = random.Random(seed)
    kinds = list(_KINDS.items())
    rows = []
    for i in range(n):
        source, make = kinds[i % len(kinds)]
        user, good, bad = make(rng)
        rows.append({"chosen": _conv(user, good), "rejected": _conv(user, bad), "source": source})
    return rows


def _group(rng: random.Random, k: int, kind: str) -> tuple[str, list[str], list[int]]:
    """(prompt, k responses, scores): each response is 3 clauses, `score` of them doing what the prompt asks
    (the case it asks for, or a polite opener). Case clauses do not depend on the score in length; polite openers
    run longer than rude ones, so length alone picks the best response about half the time (BENCHMARKS.md)."""
    if kind == "tiny-case":
        upper, topic = rng.random() < 0.5, rng.choice(_WORDS["topics"])
        user = f"Reply in {'UPPERCASE' if upper else 'lowercase'}. Tell me about {topic}."

        def clause(right: bool) -> str:
            a, b = rng.sample(_WORDS["adjectives"], 2)
            text = rng.choice(_WORDS["case_templates"]).format(t=topic, a=a, b=b)
            return text.upper() if upper == right else text.lower()
    else:
        task = rng.choice(_WORDS["tasks"])
        user = f"Can you help me with {task}?"

        def clause(right: bool) -> str:
            return _capitalize(rng.choice(_WORDS["polite" if right else "rude"]).format(x=task))
    scores = rng.sample(range(4), k)
    responses = []
    for sc in scores:
        right = [True] * sc + [False] * (3 - sc)
        rng.shuffle(right)
        responses.append(" ".join(clause(r) for r in right))
    return user, responses, scores


def make_group_rows(n: int, seed: int = 0, k: int = 4) -> list[dict]:
    """``n`` rated group rows ``{"prompt", "responses": k strings, "scores": k ints, "source"}`` (k <= 4, scores
    distinct: how many of 3 clauses are right), kinds alternating case and tone. Top-1 by chance is 1/k."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = ("tiny-case", "tiny-tone")[i % 2]
        user, responses, scores = _group(rng, k, kind)
        rows.append({"prompt": user, "responses": responses, "scores": scores, "source": kind})
    return rows


def write_jsonl(path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_preference_jsonl(path, n: int, seed: int = 0) -> Path:
    """Write ``make_preference_rows(n, seed)`` to ``path`` as jsonl; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in make_preference_rows(n, seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def lognormal_lengths(rng, median: float, sigma: float, size: int | None = None, lo: int = 1, hi: int | None = None):
    """Long-tailed lengths (tokens or words): lognormal with this median and log-space sigma, clipped to
    [lo, hi] and truncated to whole numbers. One int, or an int array of `size`. `rng` is a numpy Generator."""
    import numpy as np

    x = np.clip(rng.lognormal(math.log(median), sigma, size), lo, hi)
    return int(x) if size is None else x.astype(int)


def lognormal_text(rng, words, median: float, sigma: float, cap: int) -> str:
    """A text of lognormal length (at most `cap` words) drawn from `words`."""
    return " ".join(rng.choice(words, size=lognormal_lengths(rng, median, sigma, hi=cap)))


def lognormal_pair_sizes(n: int = 20480, seed: int = 0, cap: int = 16384) -> list[int]:
    """Token counts of ``n`` long-tailed preference pairs (a shared prompt plus two responses, each lognormal).

    Means of a few hundred tokens with a tail into thousands, like real chat preference data; pairs over ``cap``
    are left out. For packing tests and benchmarks; the same (n, seed) gives the same sizes.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt = lognormal_lengths(rng, math.exp(5.5), 1.0, n, 8, 6000)  # median ~245 tokens
    chosen = prompt + lognormal_lengths(rng, math.exp(5.8), 0.9, n, 4, 5000)  # median ~330 tokens
    rejected = prompt + lognormal_lengths(rng, math.exp(5.8), 0.9, n, 4, 5000)
    sizes = chosen + rejected
    return sizes[sizes <= cap].tolist()
