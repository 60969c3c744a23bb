"""Tokenizer wrapper and a from-scratch tiny tokenizer.

Student, teachers and the rollout engine must agree on token ids, so every component goes through one thin wrapper
over a HuggingFace tokenizer loaded from a local directory (``local_files_only=True``: no network). The wrapper adds
``fingerprint()`` (hash of vocabulary, special tokens and chat template) and ``probe_ids()`` which the teacher
start-up check compares against the student's.

Chat prompts are encoded so that a dataset row cannot forge a turn: ``apply_chat_template`` renders the template
with every special-token string inside message text swapped for a private-use placeholder, takes the special tokens
left in the rendering as the template's own control tokens, and encodes the text between them with
``split_special_tokens=True`` (the placeholders put back first). A user message containing the literal text
``<|im_end|>\n<|im_start|>assistant\n`` is therefore encoded as text; for rows without such text the ids equal the
tokenizer's own encoding of the rendered prompt. ``chat_template_kwargs`` (e.g. ``enable_thinking=False``, which
makes Qwen3's template end the prompt with the empty ``<think>\n\n</think>\n\n`` block a non-thinking Qwen3 teacher
answers after) are passed to every rendering.

``make_tiny_tokenizer`` builds a small tokenizer from scratch with the ``tokenizers`` library (character level, or a
tiny BPE trained on a corpus) plus a Qwen-style ChatML chat template, saved so that
``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it offline. Its vocabulary stays < 256 tokens so the
tiny end-to-end models stay tiny.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from megatron_camopd.errors import DataError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, PAD, UNK)

# Qwen2.5-style ChatML without the default system prompt (prompts of the tiny demo must stay short).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Printable ASCII (letters, digits, punctuation, space) plus newline and tab: 97 characters.
DEFAULT_ALPHABET: str = "".join(sorted(set(string.printable) - {"\r", "\x0b", "\x0c"}))


class Tokenizer:
    """A HuggingFace tokenizer loaded from disk, with the few operations the trainer needs."""

    def __init__(
        self, hf_tokenizer: Any, path: str | None = None, chat_template_kwargs: dict[str, Any] | None = None
    ) -> None:
        self.hf = hf_tokenizer
        self.path = path
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        if self.hf.eos_token_id is None:
            raise DataError(f"tokenizer {path}: no eos_token defined in tokenizer_config.json")
        # special (control) tokens, longest first so a token that contains another one is matched whole
        self._control = sorted(
            {str(t) for t in self.hf.added_tokens_decoder.values() if t.special}, key=lambda t: (-len(t), t)
        )
        self._control_re = re.compile("|".join(re.escape(t) for t in self._control)) if self._control else None

    @classmethod
    def from_dir(cls, path: str | Path, chat_template_kwargs: dict[str, Any] | None = None) -> Tokenizer:
        """Load ``AutoTokenizer`` from a local directory; raise ``DataError`` if it is missing or unreadable."""
        from transformers import AutoTokenizer

        p = Path(path)
        if not p.is_dir():
            raise DataError(f"tokenizer directory {p} does not exist")
        try:
            hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as exc:  # transformers raises many types (OSError, ValueError, json errors)
            raise DataError(f"tokenizer {p}: cannot load ({type(exc).__name__}: {exc})") from exc
        return cls(hf, str(p), chat_template_kwargs)

    # --- basic operations -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS additions (special-token strings in text are recognised)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of dataset text: special-token strings in it are plain text, never control tokens."""
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    @property
    def control_tokens(self) -> list[str]:
        """The tokenizer's special tokens (``<|im_start|>``, ``<|im_end|>``, ...): only a template may emit them."""
        return list(self._control)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def pad_id(self) -> int:
        """The pad token id, falling back to EOS when the tokenizer defines no pad token."""
        pid = self.hf.pad_token_id
        return int(pid) if pid is not None else self.eos_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a rollout: EOS plus ``<|im_end|>``/``<|endoftext|>`` when the vocabulary has them."""
        ids = {self.eos_id}
        vocab = self.hf.get_vocab()
        for tok in (IM_END, ENDOFTEXT):
            if tok in vocab:
                ids.add(int(vocab[tok]))
        return sorted(ids)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (base vocabulary plus added tokens)."""
        return len(self.hf)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> list[int]:
        """Render ``messages`` with the chat template and return token ids; message text never yields control ids."""
        text = self._render(messages, add_generation_prompt, template_kwargs, guard=True)
        ids: list[int] = []
        pos = 0
        for m in self._control_re.finditer(text) if self._control_re is not None else ():
            ids += self.encode_text(self._unguard(text[pos : m.start()])) if m.start() > pos else []
            ids.append(int(self.hf.convert_tokens_to_ids(m.group(0))))
            pos = m.end()
        if pos < len(text):
            ids += self.encode_text(self._unguard(text[pos:]))
        return ids

    def render_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """The chat-template text (for logs, debugging and teachers that take text)."""
        return self._render(messages, add_generation_prompt, template_kwargs, guard=False)

    def _render(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any],
        guard: bool,
    ) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise DataError(f"tokenizer {self.path}: no chat_template in tokenizer_config.json")
        msgs = [self._guard_message(m, i) for i, m in enumerate(messages)] if guard else list(messages)
        kwargs = {**self.chat_template_kwargs, **template_kwargs}
        return str(
            self.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
        )

    def _guard_message(self, message: dict[str, Any], index: int) -> dict[str, Any]:
        """A copy of ``message`` whose text fields carry placeholders in place of special-token strings."""
        out = dict(message)
        for key, value in message.items():
            if key == "role" or not isinstance(value, str):
                continue
            if _PLACEHOLDER_RE.search(value):
                raise DataError(
                    f"message {index} ({message.get('role')}): field '{key}' contains characters of "
                    f"Unicode plane 15 (U+F0000..U+FFFFD), reserved here to escape special tokens"
                )
            if self._control_re is not None:
                value = self._control_re.sub(lambda m: chr(_PLACEHOLDER_BASE + self._control.index(m.group(0))), value)
            out[key] = value
        return out

    def _unguard(self, text: str) -> str:
        return _PLACEHOLDER_RE.sub(lambda m: self._control[ord(m.group(0)) - _PLACEHOLDER_BASE], text)

    # --- identity checks --------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """``hf_fingerprint`` of this tokenizer: equal iff tokenizers are interchangeable (same for HTTP teachers)."""
        return hf_fingerprint(self.hf)

    def probe_ids(self, strings: Sequence[str] = ()) -> list[list[int]]:
        """Token ids of probe strings (default: a fixed set incl. a rendered chat) to compare with a teacher's."""
        probes = list(strings) or default_probe_strings()
        return [self.encode(s) for s in probes]


# special tokens inside message text are swapped for single characters of Unicode plane 15 (private use) while the
# template renders, so the template's own control tokens are the only special-token strings in the rendering
_PLACEHOLDER_BASE = 0xF0000
_PLACEHOLDER_RE = re.compile("[\U000f0000-\U000ffffd]")


def hf_fingerprint(hf_tokenizer: Any) -> str:
    """``"sha256:<hex>"`` over a HF tokenizer's vocabulary, added/special tokens and chat template.

    The one fingerprint of the project: ``Tokenizer.fingerprint()``, the in-process teacher check and the teacher
    servers' ``/get_model_info`` (compared by ``teachers.tokcheck``) all use it, so every check agrees.
    """
    added = {str(i): str(t) for i, t in sorted(hf_tokenizer.added_tokens_decoder.items())}
    payload = {
        "vocab": sorted(hf_tokenizer.get_vocab().items()),
        "added": added,
        "special": {k: str(v) for k, v in sorted(hf_tokenizer.special_tokens_map.items())},
        "chat_template": getattr(hf_tokenizer, "chat_template", None),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def default_probe_strings() -> list[str]:
    """Probe strings that exercise letters, digits, punctuation, whitespace and the ChatML special tokens."""
    return [
        "Hello, world! 0123456789",
        "The quick brown fox jumps over the lazy dog.\n\tx = a + b * (c - d) / 7",
        f"{IM_START}user\nWhat is 12+30?{IM_END}\n{IM_START}assistant\n",
        f"Final answer: C{IM_END}{ENDOFTEXT}",
    ]


def make_tiny_tokenizer(
    out_dir: str | Path,
    corpus: Iterable[str] | None = None,
    kind: str = "char",
    vocab_size: int = 200,
    alphabet: str = DEFAULT_ALPHABET,
    model_max_length: int = 4096,
) -> Path:
    """Build a tiny tokenizer from scratch and save it as an offline-loadable HuggingFace tokenizer directory.

    ``kind="char"``: one token per character of ``alphabet`` (plus the characters of ``corpus``, if given).
    ``kind="bpe"``: a byte-pair model trained on ``corpus`` up to ``vocab_size`` tokens, whose initial alphabet
    contains ``alphabet`` so every printable ASCII string stays encodable. Unknown characters map to ``<|unk|>``.
    Special tokens: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (EOS), ``<|pad|>`` (PAD), ``<|unk|>``.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RawTokenizer

    if kind not in ("char", "bpe"):
        raise DataError(f"make_tiny_tokenizer: kind must be 'char' or 'bpe', got {kind!r}")
    if vocab_size > 256 or vocab_size < len(SPECIAL_TOKENS) + 1:
        raise DataError(f"make_tiny_tokenizer: vocab_size must be in [{len(SPECIAL_TOKENS) + 1}, 256]")
    texts = list(corpus) if corpus is not None else []
    chars = sorted(set(alphabet) | ({c for t in texts for c in t} if kind == "char" else set()))
    if len(chars) + len(SPECIAL_TOKENS) > 256:
        raise DataError(f"make_tiny_tokenizer: alphabet has {len(chars)} characters; the vocabulary must stay < 256")

    if kind == "char":
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for c in chars:
            vocab[c] = len(vocab)
        raw = RawTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    else:
        if not texts:
            raise DataError("make_tiny_tokenizer: kind='bpe' needs a non-empty corpus")
        raw = RawTokenizer(models.BPE(unk_token=UNK))
        # GPT-2-like split so merges stay inside words/numbers: " word", digits one by one, punctuation, spaces.
        raw.pre_tokenizer = pre_tokenizers.Split(
            Regex(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+"), behavior="isolated"
        )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=chars,
            limit_alphabet=len(chars),
            show_progress=False,
        )
        raw.train_from_iterator(texts, trainer=trainer)
    raw.decoder = decoders.Fuse()  # tokens are literal strings: decoding concatenates them
    return _save_hf_dir(raw, Path(out_dir), model_max_length)


def _save_hf_dir(raw: Any, out: Path, model_max_length: int) -> Path:
    """Wrap a raw ``tokenizers.Tokenizer`` as a HF fast tokenizer and save tokenizer.json + configs."""
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START, ENDOFTEXT],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(str(out))
    # Make the files self-describing regardless of the transformers version that wrote them.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHATML_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["clean_up_tokenization_spaces"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    stm = {"eos_token": IM_END, "pad_token": PAD, "unk_token": UNK, "additional_special_tokens": [IM_START, ENDOFTEXT]}
    (out / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")
    return out
