"""Teachers: the `Teacher` interface, the SGLang-protocol HTTP client with replica failover, and the start-up
tokenizer check. In-process (Megatron) teachers implement the same `Teacher` protocol."""

from .base import Scorer, Teacher, TeacherScores
from .http import HttpTeacher
from .tokcheck import TokenizerInfo, check_tokenizer, default_probe_ids, tokenizer_fingerprint

__all__ = [
    "HttpTeacher",
    "Scorer",
    "Teacher",
    "TeacherScores",
    "TokenizerInfo",
    "check_tokenizer",
    "default_probe_ids",
    "tokenizer_fingerprint",
]
