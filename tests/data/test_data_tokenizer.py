"""The tiny tokenizer loads with plain transformers, round-trips text and renders ChatML; fingerprints differ."""

import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from megatron_camopd.data.tokenizer import DEFAULT_ALPHABET, Tokenizer, make_tiny_tokenizer
from megatron_camopd.errors import DataError


def test_files_and_autotokenizer(tiny_tok_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tiny_tok_dir / name).is_file()
    cfg = json.loads((tiny_tok_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]
    hf = AutoTokenizer.from_pretrained(str(tiny_tok_dir), local_files_only=True)
    assert len(hf) < 256
    text = hf.apply_chat_template([{"role": "user", "content": "2+3="}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n2+3=<|im_end|>\n<|im_start|>assistant\n"


def test_special_ids_and_chat_ids(tiny_tok: Tokenizer) -> None:
    vocab = tiny_tok.hf.get_vocab()
    assert tiny_tok.eos_id == vocab["<|im_end|>"]
    assert tiny_tok.pad_id == vocab["<|pad|>"] != tiny_tok.eos_id
    assert set(tiny_tok.stop_ids) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    assert tiny_tok.vocab_size == len(vocab) < 256
    ids = tiny_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    # special tokens are single ids; "user\nhi" and "assistant\n" are one id per character
    assert ids[0] == vocab["<|im_start|>"] and ids.count(tiny_tok.eos_id) == 1
    assert len(ids) == 1 + len("user\nhi") + 1 + 1 + 1 + len("assistant\n")
    assert tiny_tok.decode(ids) == tiny_tok.render_chat([{"role": "user", "content": "hi"}])
    no_gen = tiny_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert ids[: len(no_gen)] == no_gen and len(ids) > len(no_gen)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=DEFAULT_ALPHABET, max_size=80))
@example("<|im_start|>user\nhi<|im_end|>")
def test_roundtrip_printable(tiny_tok: Tokenizer, text: str) -> None:
    # dataset text: one id per character, a special-token string included (it stays text)
    ids = tiny_tok.encode_text(text)
    assert len(ids) == len(text)
    assert tiny_tok.decode(ids) == text
    assert not set(ids) & {tiny_tok.hf.convert_tokens_to_ids(t) for t in tiny_tok.control_tokens}


def test_encode_recognises_special_tokens(tiny_tok: Tokenizer) -> None:
    # the template path (encode) maps a special-token string to its one control id; encode_text never does
    im_start = tiny_tok.hf.convert_tokens_to_ids("<|im_start|>")
    assert tiny_tok.encode("<|im_start|>") == [im_start]
    assert len(tiny_tok.encode_text("<|im_start|>")) == len("<|im_start|>")


def test_unknown_char_maps_to_unk(tiny_tok: Tokenizer) -> None:
    assert tiny_tok.decode(tiny_tok.encode("aé")) == "a<|unk|>"


def test_bpe_kind_roundtrip_and_fingerprint(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    corpus = ["the cat sat on the mat", "reverse: hello", "12+30=42"] * 30
    bpe = Tokenizer.from_dir(make_tiny_tokenizer(tmp_path / "bpe", corpus=corpus, kind="bpe", vocab_size=160))
    assert bpe.vocab_size <= 160
    assert len(bpe.encode(" the cat")) < len(" the cat")  # merges learned
    s = "Hello,  world!\n\tsort: 3141 ~"
    assert bpe.decode(bpe.encode(s)) == s
    assert bpe.fingerprint() != tiny_tok.fingerprint()
    assert bpe.probe_ids() != tiny_tok.probe_ids()


def test_fingerprint_stable_and_sensitive(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    same = Tokenizer.from_dir(make_tiny_tokenizer(tmp_path / "same"))
    assert same.fingerprint() == tiny_tok.fingerprint()
    assert same.probe_ids(["abc"]) == tiny_tok.probe_ids(["abc"])
    other = Tokenizer.from_dir(make_tiny_tokenizer(tmp_path / "other", alphabet=DEFAULT_ALPHABET.replace("~", "")))
    assert other.fingerprint() != tiny_tok.fingerprint()
    # same vocabulary, different chat template -> different fingerprint
    cfg_path = tmp_path / "same" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = cfg["chat_template"].replace("'\\n'", "'\\n\\n'")
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "same" / "chat_template.jinja").unlink(missing_ok=True)
    changed = Tokenizer.from_dir(tmp_path / "same")
    assert changed.fingerprint() != tiny_tok.fingerprint()


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load"):
        Tokenizer.from_dir(tmp_path / "empty")
    with pytest.raises(DataError, match="corpus"):
        make_tiny_tokenizer(tmp_path / "x", kind="bpe")
    with pytest.raises(DataError, match="vocab_size"):
        make_tiny_tokenizer(tmp_path / "x", vocab_size=1000)
