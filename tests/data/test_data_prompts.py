"""Prompt formats, malformed rows (file:line), over-long policies, determinism/resume, Nemotron sampling, Parquet."""

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from megatron_camopd.data.formats import MEDICAL_SYSTEM
from megatron_camopd.data.prompts import PromptSource, PromptStream, proportional_allocation
from megatron_camopd.data.synthetic import make_examples, write_parquet
from megatron_camopd.data.tokenizer import Tokenizer
from megatron_camopd.errors import DataError


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def stream(tok: Tokenizer, path: Path, fmt: str, **kw: Any) -> PromptStream:
    src_kw = {k: kw.pop(k) for k in ("domain", "num_samples") if k in kw}
    return PromptStream([PromptSource(str(path), fmt, **src_kw)], tok, **kw)


def test_messages_format(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    rows = [
        {
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}],
            "answer": "4",
            "domain": "math",
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "id": 7},
    ]
    s = stream(tiny_tok, write_jsonl(tmp_path / "m.jsonl", rows), "messages", domain="general", shuffle=False)
    a, b = s.next_batch(2)
    assert a.domain == "math" and a.reference == "4" and a.source == f"{tmp_path / 'm.jsonl'}:1"
    assert a.prompt_ids == tiny_tok.apply_chat_template(rows[0]["messages"])
    assert b.uid == "7" and b.domain == "general" and b.reference is None
    assert b.messages == [{"role": "user", "content": "hi"}]  # trailing assistant turn dropped


def test_prompt_format(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    rows = [{"prompt": "copy: ab", "system": "sys", "answer": "ab"}]
    (p,) = stream(tiny_tok, write_jsonl(tmp_path / "p.jsonl", rows), "prompt").next_batch(1)
    assert p.messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "copy: ab"}]
    assert tiny_tok.decode(p.prompt_ids).endswith("copy: ab<|im_end|>\n<|im_start|>assistant\n")


def test_nemotron_drops_reference_reply(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    rows = [
        {
            "category": "math",
            "messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "secret reference"}],
        }
    ]
    (p,) = stream(tiny_tok, write_jsonl(tmp_path / "n.jsonl", rows), "nemotron").next_batch(1)
    assert p.category == "math" and p.messages == [{"role": "user", "content": "1+1"}]
    assert "secret" not in tiny_tok.decode(p.prompt_ids)


def test_coser_first_n_minus_1_turns(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    conv = [
        {"from": "system", "value": "You are Ahab."},
        {"from": "human", "value": "Whale?"},
        {"from": "gpt", "value": "Aye."},
        {"from": "human", "value": "Where?"},
        {"from": "gpt", "value": "There"},
    ]
    (p,) = stream(
        tiny_tok, write_jsonl(tmp_path / "c.jsonl", [{"conversations": conv}]), "coser", domain="roleplay"
    ).next_batch(1)
    assert [m["role"] for m in p.messages] == ["system", "user", "assistant", "user"]
    assert p.reference == "There" and p.domain == "roleplay"


def test_medical_mc_template(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    rows = [
        {"question": "Which vitamin?", "opa": "A1", "opb": "B12", "opc": "C", "opd": "D", "cop": 1},
        {"question": "Q2", "options": {"A": "x", "B": "y", "C": "z", "D": "w", "E": "v"}, "answer": "e"},
        {"question": "Describe asthma."},
    ]
    s = stream(tiny_tok, write_jsonl(tmp_path / "med.jsonl", rows), "medical_mc", shuffle=False)
    p1, p2, p3 = s.next_batch(3)
    assert p1.reference == "B" and p2.reference == "E" and p3.reference is None
    assert p1.messages[0] == {"role": "system", "content": MEDICAL_SYSTEM}
    user = p1.messages[1]["content"]
    assert user.startswith("Which vitamin?\nA. A1\nB. B12\nC. C\nD. D\n") and "Final answer: <letter>" in user
    assert "E. v" in p2.messages[1]["content"]
    assert "professional medical advice" in p3.messages[1]["content"]


BAD_ROWS = [
    ("{not json", "m.jsonl:2: invalid JSON"),
    ({"messages": "hi"}, "field 'messages': must be a list"),
    ({"nothing": 1}, "field 'messages': missing"),
    ({"messages": []}, "field 'messages': is empty"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "field 'messages[0].role': unknown role"),
    ({"messages": [{"role": "user", "content": 3}]}, "field 'messages[0].content': must be a string"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "has no user turn"),
    ([1, 2], "row must be a JSON object"),
]


@pytest.mark.parametrize("bad,expected", BAD_ROWS)
def test_malformed_row_errors_name_file_line_field(
    tmp_path: Path, tiny_tok: Tokenizer, bad: Any, expected: str
) -> None:
    good = {"messages": [{"role": "user", "content": "ok"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [good, bad, good])
    with pytest.raises(DataError) as exc:
        stream(tiny_tok, path, "messages")
    assert f"{path}:2" in str(exc.value) and expected in str(exc.value)


def test_format_specific_errors(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    cases = [
        ("nemotron", {"messages": [{"role": "user", "content": "x"}]}, "field 'category'"),
        ("prompt", {"prompt": ""}, "field 'prompt'"),
        ("coser", {"messages": [{"role": "user", "content": "x"}]}, "at least 2 turns"),
        ("medical_mc", {"question": "q", "opa": "x", "opb": "y", "cop": 5}, "field 'cop'"),
        ("medical_mc", {"question": "q", "opa": "x", "opb": "y", "answer": "Z"}, "field 'answer'"),
        ("messages", {"messages": [{"role": "user", "content": "x"}], "domain": 3}, "field 'domain'"),
    ]
    for fmt, row, expected in cases:
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", [row])
        with pytest.raises(DataError, match=expected) as exc:
            stream(tiny_tok, path, fmt)
        assert f"{path}:1" in str(exc.value)


def test_skip_mode_counts_bad_rows(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    good = {"messages": [{"role": "user", "content": "ok"}]}
    rows = [good, *[b for b, _ in BAD_ROWS], good, ""]  # blank line is ignored, not bad
    s = stream(tiny_tok, write_jsonl(tmp_path / "m.jsonl", rows), "messages", on_bad_row="skip")
    assert len(s) == 2
    c = s.counters
    assert c["bad_rows"] == len(BAD_ROWS) and c["rows"] == len(BAD_ROWS) + 2 and c["prompts"] == 2
    assert "m.jsonl:2" in s.bad_examples[0] and len(s.bad_examples) == 5


def test_overlong_truncate_and_skip(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    rows = [{"prompt": "x" * 5}, {"prompt": "y" * 60}, {"prompt": "z" * 70}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    full = [tiny_tok.apply_chat_template([{"role": "user", "content": r["prompt"]}]) for r in rows]
    limit = len(full[0]) + 10
    t = stream(tiny_tok, path, "prompt", max_prompt_len=limit, overlong="truncate", shuffle=False)
    got = t.next_batch(3)
    assert t.counters["truncated"] == 2 and [p.truncated for p in got] == [False, True, True]
    assert got[1].prompt_ids == full[1][-limit:]  # left-truncated: the end of the conversation is kept
    assert tiny_tok.decode(got[1].prompt_ids).endswith("<|im_start|>assistant\n")
    s = stream(tiny_tok, path, "prompt", max_prompt_len=limit, overlong="skip")
    assert len(s) == 1 and s.counters["skipped_overlong"] == 2 and s.counters["truncated"] == 0
    with pytest.raises(DataError, match="no usable prompts"):
        stream(tiny_tok, path, "prompt", max_prompt_len=3, overlong="skip")


def _uids(batches: list[list[Any]]) -> list[str]:
    return [p.uid for b in batches for p in b]


def test_determinism_epochs_and_resume(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "id": i} for i in range(10)])
    a, b = (stream(tiny_tok, path, "prompt", seed=3) for _ in range(2))
    seq_a = _uids([a.next_batch(4) for _ in range(6)])  # 24 prompts = 2.4 epochs
    assert seq_a == _uids([b.next_batch(4) for _ in range(6)])
    epochs = [seq_a[0:10], seq_a[10:20]]
    assert all(sorted(e, key=int) == [str(i) for i in range(10)] for e in epochs)  # each epoch a permutation
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert _uids([stream(tiny_tok, path, "prompt", seed=4).next_batch(10)]) != epochs[0]
    # resume mid-epoch from a JSON-serialised state
    c = stream(tiny_tok, path, "prompt", seed=3)
    head = _uids([c.next_batch(4) for _ in range(3)])
    state = json.loads(json.dumps(c.state_dict()))
    d = stream(tiny_tok, path, "prompt", seed=3)
    d.load_state_dict(state)
    assert head + _uids([d.next_batch(4) for _ in range(3)]) == seq_a
    assert d.counters["served"] == 24 and d.counters["epoch"] == 2


def test_resume_refuses_other_data(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    p1 = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"q{i}"} for i in range(5)])
    p2 = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"q{i}"} for i in range(6)])
    state = stream(tiny_tok, p1, "prompt").state_dict()
    with pytest.raises(DataError, match="num_prompts"):
        stream(tiny_tok, p2, "prompt").load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        stream(tiny_tok, p1, "prompt", seed=9).load_state_dict(state)


def test_nemotron_proportional_sampling(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    cats = ["math"] * 60 + ["code"] * 30 + ["chat"] * 9 + ["tool"] * 1
    rows = [{"category": c, "messages": [{"role": "user", "content": f"{c}{i}"}]} for i, c in enumerate(cats)]
    path = write_jsonl(tmp_path / "nemo.jsonl", rows)
    s = stream(tiny_tok, path, "nemotron", num_samples=20, seed=1)
    counts = Counter(p.category for p in s.prompts)
    assert counts == {"math": 12, "code": 6, "chat": 2}  # 11.8/6/1.8/0.2 rounded by largest remainder
    assert len({p.uid for p in s.prompts}) == 20
    again = stream(tiny_tok, path, "nemotron", num_samples=20, seed=1)
    assert [p.uid for p in again.prompts] == [p.uid for p in s.prompts]
    assert [p.uid for p in stream(tiny_tok, path, "nemotron", num_samples=20, seed=2).prompts] != [
        p.uid for p in s.prompts
    ]


def test_proportional_allocation_sums() -> None:
    alloc = proportional_allocation({"a": 746622, "b": 1896395, "c": 2044407, "d": 20662167, "e": 310051}, 10000)
    assert sum(alloc.values()) == 10000 and alloc["d"] == 8052 and alloc["e"] == 121
    assert proportional_allocation({"a": 2, "b": 1}, 10) == {"a": 2, "b": 1}


def test_parquet_and_multi_source(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    pq_path = write_parquet(make_examples("reverse", 7, seed=0), tmp_path / "r.parquet", fmt="messages")
    jl_path = write_jsonl(tmp_path / "j.jsonl", [{"prompt": "copy: a", "answer": "a"}])
    s = PromptStream(
        [PromptSource(str(pq_path), "messages"), PromptSource(str(jl_path), "prompt", domain="dom")],
        tiny_tok,
        shuffle=False,
    )
    got = s.next_batch(8)
    assert [p.source for p in got[:2]] == [f"{pq_path}:1", f"{pq_path}:2"]
    assert got[0].uid == "reverse-0-0" and got[0].reference == got[0].messages[0]["content"][9:][::-1]
    assert s.domain_counts() == {"general": 7, "dom": 1}
    bad_pq = tmp_path / "bad.parquet"
    bad_pq.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read Parquet"):
        stream(tiny_tok, bad_pq, "messages")
    with pytest.raises(DataError, match="does not exist"):
        stream(tiny_tok, tmp_path / "nope.jsonl", "messages")
    with pytest.raises(DataError, match="unknown format"):
        PromptSource(str(jl_path), "alpaca")


def test_medical_options_validation(tmp_path: Path, tiny_tok: Tokenizer) -> None:
    for row, expected in [
        ({"question": "q", "options": {"a": "x", "A": "y"}}, "duplicate option letters"),
        ({"question": "q", "options": {"A": 3}}, "must be a letter A-J mapping to a string"),
        ({"question": "q", "options": "A. x"}, "must be an object or a list"),
    ]:
        path = write_jsonl(tmp_path / "med.jsonl", [row])
        with pytest.raises(DataError, match=expected):
            stream(tiny_tok, path, "medical_mc")
    path = write_jsonl(tmp_path / "med.jsonl", [{"question": "q", "options": ["x", "y"], "answer": "B"}])
    (p,) = stream(tiny_tok, path, "medical_mc").next_batch(1)
    assert p.reference == "B" and "A. x\nB. y\n" in p.messages[1]["content"]
