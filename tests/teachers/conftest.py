"""Fixtures for teacher/server tests: a tiny random Qwen3 model and char-level tokenizers saved as HF dirs."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_camopd.serve.hf_scorer import HFScorer, load_scorer
from tests.helpers import ONE_LAYER_CONFIG, tiny_hf_model

VOCAB = 64
SPECIALS = ["<pad>", "<unk>", "<eos>"]
CHARS = (string.ascii_lowercase + string.digits + " .,!?=+*()\n-:;'\"")[: VOCAB - len(SPECIALS)]


def make_tokenizer(chars: str) -> PreTrainedTokenizerFast:
    """A char-level tokenizer over `chars` (the order of `chars` decides the ids)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        clean_up_tokenization_spaces=False,
    )


def make_checkpoint(path: Path, chars: str = CHARS, seed: int = 0) -> Path:
    tiny_hf_model(path, vocab_size=VOCAB, seed=seed, **ONE_LAYER_CONFIG)
    make_tokenizer(chars).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="session")
def other_tok_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same model, a tokenizer with the same size but another id order (swapped letters)."""
    chars = CHARS[1] + CHARS[0] + CHARS[2:]
    return make_checkpoint(tmp_path_factory.mktemp("tiny_qwen3_othertok"), chars=chars)


@pytest.fixture(scope="session")
def scorer(tiny_ckpt: Path) -> HFScorer:
    return load_scorer(str(tiny_ckpt))


def direct_logprobs(scorer: HFScorer, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..len-1, computed straight from the model (no padding, no batching)."""
    with torch.no_grad():
        logits = scorer.model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
