"""Data: tokenizer + chat template, prompt streams (JSONL/JSON/Parquet), outcome verifiers, synthetic tasks."""

from megatron_camopd.data.prompts import Prompt, PromptSource, PromptStream
from megatron_camopd.data.tokenizer import Tokenizer, make_tiny_tokenizer
from megatron_camopd.data.verifiers import get_verifier

__all__ = ["Prompt", "PromptSource", "PromptStream", "Tokenizer", "get_verifier", "make_tiny_tokenizer"]
