"""Teachers: the `Teacher` interface, the HTTP clients with replica failover (SGLang's `/generate`, vLLM's
`/v1/completions`), and the start-up tokenizer check. In-process (Megatron) teachers implement the same `Teacher`
protocol. `TEACHER_TRANSPORTS` maps a teacher section's `server` to its client class (`teacher_client`): a new
engine is one client module plus its entry here and in `config.sections.TeacherServer`."""

import importlib

from .base import Scorer, Teacher, TeacherScores
from .http import HttpTeacher
from .tokcheck import TokenizerInfo, check_tokenizer, default_probe_ids, tokenizer_fingerprint

TEACHER_TRANSPORTS = {
    "sglang": "megatron_camopd.teachers.http:HttpTeacher",
    "vllm": "megatron_camopd.teachers.vllm:VllmTeacher",
}


def teacher_client(server: str) -> type[HttpTeacher]:
    """The client class of a served teacher's engine (`teachers.<name>.server`), imported when asked for."""
    try:
        module, attr = TEACHER_TRANSPORTS[server].split(":")
    except KeyError:
        raise ValueError(f"unknown teacher server {server!r} (known: {', '.join(TEACHER_TRANSPORTS)})") from None
    cls: type[HttpTeacher] = getattr(importlib.import_module(module), attr)
    return cls


__all__ = [
    "TEACHER_TRANSPORTS",
    "HttpTeacher",
    "Scorer",
    "Teacher",
    "TeacherScores",
    "TokenizerInfo",
    "check_tokenizer",
    "default_probe_ids",
    "teacher_client",
    "tokenizer_fingerprint",
]
