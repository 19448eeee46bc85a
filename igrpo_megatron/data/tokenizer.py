"""Train a tiny tokenizer from a list of texts and save it as a Hugging Face tokenizer directory.

No pretrained tokenizer can be downloaded in CI, yet vLLM, transformers and the data pipeline all
expect a real HF tokenizer directory. This builds one with the ``tokenizers`` library: byte-level BPE
(every string round-trips) or character-level (tiny, readable ids; unseen characters become
``<unk>``), with ChatML-style special tokens and a chat template.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

TOKENIZER_KINDS = ("byte_bpe", "char")

# ChatML, as used by Qwen2-family models: each turn is "<|im_start|>role\ncontent<|im_end|>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class SpecialTokens:
    """Special tokens of the tiny tokenizer. They get the lowest ids, in this order."""

    pad: str = "<|endoftext|>"
    eos: str = "<|im_end|>"
    im_start: str = "<|im_start|>"
    unk: str = "<unk>"

    def as_list(self) -> list[str]:
        return list(dict.fromkeys([self.pad, self.eos, self.im_start, self.unk]))


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, kind: str = "byte_bpe",
                    special: SpecialTokens = SpecialTokens(), min_frequency: int = 2) -> Tokenizer:
    """A raw ``tokenizers.Tokenizer`` trained on ``texts`` with at most ``vocab_size`` entries."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is unknown; use one of {list(TOKENIZER_KINDS)}.")
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer got no texts; pass the training corpus (a list of strings).")
    if kind == "byte_bpe":
        return _train_byte_bpe(texts, vocab_size, special, min_frequency)
    return _build_char_level(texts, vocab_size, special)


def _train_byte_bpe(texts: Sequence[str], vocab_size: int, special: SpecialTokens,
                    min_frequency: int) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    floor = len(alphabet) + len(special.as_list())
    if vocab_size < floor:
        raise ValueError(f"vocab_size = {vocab_size} is too small for byte-level BPE: it needs at least "
                         f"{floor} (256 bytes + special tokens); raise it or use kind='char'.")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special.as_list(), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _build_char_level(texts: Sequence[str], vocab_size: int, special: SpecialTokens) -> Tokenizer:
    specials = special.as_list()
    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size = {vocab_size} leaves no room for characters after the "
                         f"{len(specials)} special tokens; raise it.")
    counts = Counter(ch for text in texts for ch in text)
    # Most frequent characters first; ties broken by the character so the vocabulary is reproducible.
    chars = sorted(counts, key=lambda c: (-counts[c], c))[: vocab_size - len(specials)]
    if len(counts) > len(chars):
        logger.warning("char tokenizer: %d of %d distinct characters do not fit vocab_size=%d; they will "
                       "encode as %s", len(counts) - len(chars), len(counts), vocab_size, special.unk)
    vocab = {tok: i for i, tok in enumerate(specials + sorted(chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special.unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def to_hf_tokenizer(tok: Tokenizer, *, special: SpecialTokens = SpecialTokens(),
                    model_max_length: int = 1024):
    """Wrap a raw tokenizer as ``PreTrainedTokenizerFast`` with pad/eos/unk and the chat template."""
    from transformers import PreTrainedTokenizerFast  # heavy import, only when needed

    tok.add_special_tokens(special.as_list())  # marks them special (never split, skippable on decode)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special.eos, pad_token=special.pad,
                                 unk_token=special.unk, additional_special_tokens=[special.im_start],
                                 model_max_length=model_max_length, padding_side="left")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int, *, kind: str = "byte_bpe",
                    special: SpecialTokens = SpecialTokens(), model_max_length: int = 1024,
                    min_frequency: int = 2) -> Path:
    """Train a tokenizer on ``texts`` and save it under ``out_dir`` (loadable by AutoTokenizer and vLLM)."""
    tok = train_tokenizer(texts, vocab_size, kind=kind, special=special, min_frequency=min_frequency)
    hf = to_hf_tokenizer(tok, special=special, model_max_length=model_max_length)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    logger.info("saved %s tokenizer with %d tokens to %s", kind, len(hf), out)
    return out
