"""The tiny tokenizer: round trips, special tokens, chat template, loading by transformers and vLLM."""

from __future__ import annotations

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from igrpo_megatron.data.tokenizer import CHAT_TEMPLATE, SpecialTokens, build_tokenizer
from tests.helpers.tiny_models import tiny_corpus

SAMPLES = [
    "What is 12 + 30? The answer is \\boxed{42}.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "unicode: héllo wörld, ∑ x², 数学, emoji 🙂",
    "<think>\nreasoning\n</think>\n",
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return build_tokenizer(tiny_corpus(), tmp_path_factory.mktemp("bpe"), 512, kind="byte_bpe")


@pytest.fixture(scope="module")
def bpe_tokenizer(bpe_dir):
    return AutoTokenizer.from_pretrained(str(bpe_dir))


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    return build_tokenizer(tiny_corpus(), tmp_path_factory.mktemp("char"), 64, kind="char")


def test_byte_bpe_round_trips_any_text(bpe_dir):
    tok = AutoTokenizer.from_pretrained(str(bpe_dir))
    for text in SAMPLES:  # byte-level: even characters never seen in training come back intact
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok) <= 512
    # Training merged frequent corpus strings: a corpus word takes fewer tokens than its characters.
    assert len(tok.encode("answer", add_special_tokens=False)) < len("answer")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_byte_bpe_round_trip_property(bpe_tokenizer, text):
    assert bpe_tokenizer.decode(bpe_tokenizer.encode(text, add_special_tokens=False)) == text


def test_special_tokens_are_single_ids_and_skippable(bpe_dir):
    tok = AutoTokenizer.from_pretrained(str(bpe_dir))
    special = SpecialTokens()
    # Special tokens take the lowest ids in a fixed order: pad 0, eos 1, im_start 2, unk 3.
    assert (tok.pad_token, tok.pad_token_id) == (special.pad, 0)
    assert (tok.eos_token, tok.eos_token_id) == (special.eos, 1)
    assert tok.convert_tokens_to_ids(special.im_start) == 2
    ids = tok.encode(f"{special.im_start}user\nhi{special.eos}", add_special_tokens=False)
    assert ids[0] == 2 and ids[-1] == 1
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_renders_chatml(bpe_dir):
    tok = AutoTokenizer.from_pretrained(str(bpe_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.chat_template == CHAT_TEMPLATE
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


def test_char_tokenizer_one_id_per_character(char_dir):
    tok = AutoTokenizer.from_pretrained(str(char_dir))
    text = "What is 12 + 30?"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert len(tok) <= 64
    unseen = tok.encode("é", add_special_tokens=False)  # not in the corpus: becomes <unk>
    assert unseen == [tok.unk_token_id]


@pytest.mark.parametrize("kind,size", [("byte_bpe", 100), ("char", 4)])
def test_too_small_vocab_is_rejected_with_the_fix(tmp_path, kind, size):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["abc"], tmp_path, size, kind=kind)


def test_unknown_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="byte_bpe"):
        build_tokenizer(["abc"], tmp_path, 300, kind="wordpiece")


@pytest.mark.vllm
def test_vllm_loads_the_tokenizer(sidecar, tiny_model_dir):
    """The server's tokenizer (from the tiny model's directory) agrees with transformers'."""
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = SAMPLES[0]
    body = requests.post(f"{sidecar.url}/tokenize", json={"prompt": text, "add_special_tokens": False},
                         timeout=30).json()
    assert body["tokens"] == tok.encode(text, add_special_tokens=False)
    back = requests.post(f"{sidecar.url}/detokenize", json={"tokens": body["tokens"]}, timeout=30).json()
    assert back["prompt"] == text
    messages = [{"role": "user", "content": "What is 1 + 1?"}]
    chat = requests.post(f"{sidecar.url}/tokenize", json={"messages": messages, "add_generation_prompt": True},
                         timeout=30).json()
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False)
