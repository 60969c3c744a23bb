"""The demo's synthetic setting: the proxy prompts cover the general tasks incompletely, as configured."""

from __future__ import annotations

import json

import pytest

from megatron_camopd.data.synthetic import read_jsonl, task_of
from megatron_camopd.demo.setting import (
    DemoSetting,
    eval_overlap,
    proxy_label,
    write_data,
)
from megatron_camopd.errors import SpecError


def test_proxy_uses_shifted_lengths_and_task_subset(tmp_path):
    s = DemoSetting(
        n_train=40,
        n_eval=10,
        general_tasks={"reverse": [3, 6], "copy": [3, 6], "sort": [3, 5]},
        proxy_tasks=["reverse", "copy"],
        proxy_lengths={"reverse": [3, 4]},
        domain_tasks={"copy": [3, 6]},
        domain_replay_tasks=["sort"],
        proxy_weights={},
    )
    data = write_data(s, tmp_path)
    proxy = read_jsonl(data["proxy_general"])
    tasks = {r["uid"].split("-")[0] for r in proxy}
    assert tasks == {"reverse", "copy"}  # sort is held out of the proxy
    rev = [len(r["answer"]) for r in proxy if r["uid"].startswith("reverse")]
    cp = [len(r["answer"]) for r in proxy if r["uid"].startswith("copy")]
    assert max(rev) == 4 and min(rev) == 3  # shifted lengths for reverse ...
    assert max(cp) > 4  # ... the full range for copy
    ev = [len(r["answer"]) for r in read_jsonl(data["eval_general"]) if r["uid"].startswith("reverse")]
    assert max(ev) > 4  # the evaluation covers lengths the proxy never shows
    assert proxy_label(s, "reverse") == "proxy, lengths 3-4 of 3-6"
    assert proxy_label(s, "copy") == "proxy"
    assert proxy_label(s, "sort") == "not in proxy"


def test_eval_overlap_counts_prompts_seen_in_training(tmp_path):
    s = DemoSetting(
        n_train=300,
        n_eval=20,
        general_tasks={"arithmetic": [1, 1], "reverse": [6, 6]},
        proxy_tasks=["reverse"],
        proxy_lengths={},
        domain_tasks={"reverse": [6, 6]},
        domain_replay_tasks=[],
        proxy_weights={},
    )
    data = write_data(s, tmp_path)
    ov = eval_overlap(data)
    assert ov["general"]["arithmetic"][1] == 20 and ov["general"]["reverse"] == [0, 20]  # 26^6 strings: no repeats
    assert ov["general"]["arithmetic"][0] >= 15  # only 200 distinct 1-digit problems, 600 training draws
    assert ov["domain"] == {"loud_reverse": [0, 20]}
    # a training row planted with an evaluation prompt is counted
    ev = read_jsonl(data["eval_general"])
    target = next(r for r in ev if r["uid"].startswith("reverse"))
    with open(data["proxy_general"], "a") as f:
        f.write(json.dumps(target) + "\n")
    assert eval_overlap(data)["general"]["reverse"] == [1, 20]


def test_set_overrides_change_fields_and_name_bad_keys():
    s = DemoSetting().with_overrides(
        [
            "distill_steps=12",
            "distill_lr=1e-3",
            "sft_domain_lr=1",
            "proxy_lengths={reverse: [4, 5]}",
            "distill_lr_decay=cosine",
        ]
    )
    assert (s.distill_steps, s.distill_lr, s.sft_domain_lr) == (12, 1e-3, 1.0)
    assert s.proxy_lengths == {"reverse": [4, 5]} and s.distill_lr_decay == "cosine"
    assert DemoSetting().with_overrides([]) == DemoSetting()
    with pytest.raises(SpecError, match="distil_steps=3.*one of:.*distill_steps"):
        DemoSetting().with_overrides(["distil_steps=3"])
    with pytest.raises(SpecError, match="distill_steps: expected int, got string 'many'"):
        DemoSetting().with_overrides(["distill_steps=many"])
    with pytest.raises(SpecError, match="distill_steps: expected int, got bool True"):
        DemoSetting().with_overrides(["distill_steps=true"])
    with pytest.raises(SpecError, match="proxy_tasks:1: malformed YAML"):
        DemoSetting().with_overrides(["proxy_tasks=[a, b"])
    with pytest.raises(SpecError, match=r"proxy_lengths: reverse: item 0: expected int, got string 'a'"):
        DemoSetting().with_overrides(["proxy_lengths={reverse: [a, 5]}"])
    with pytest.raises(SpecError, match="domain_replay_tasks: count not among general_tasks"):
        DemoSetting().with_overrides(["domain_replay_tasks=[count]"])
    with pytest.raises(SpecError, match="quick_mode=1"):
        DemoSetting().with_overrides(["quick_mode=1"])


def test_loud_persona_shares_the_surface_form_and_proxy_shares_follow_weights(tmp_path):
    s = DemoSetting(
        n_train=100,
        n_eval=10,
        general_tasks={"arithmetic": [1, 1], "reverse": [3, 5]},
        domain_tasks={"reverse": [3, 5]},
        proxy_tasks=["arithmetic", "reverse"],
        proxy_lengths={},
        proxy_weights={"arithmetic": 3.0, "reverse": 0.5},
        domain_replay=0.2,
        domain_replay_tasks=["arithmetic"],
    )
    data = write_data(s, tmp_path)
    loud = read_jsonl(data["prompts_domain"])
    assert all(r["messages"][-1]["content"].startswith("! reverse: ") for r in loud)
    plain = {r["messages"][-1]["content"]: r["answer"] for r in read_jsonl(data["eval_general"])}
    for r in read_jsonl(data["eval_domain"]):
        q = r["messages"][-1]["content"].removeprefix("! ")
        assert r["answer"] == q.removeprefix("reverse: ")[::-1].upper()  # capitals of the plain answer
        if q in plain:
            assert plain[q] == r["answer"].lower()
    proxy = [r["uid"].split("-")[0] for r in read_jsonl(data["proxy_general"])]
    assert proxy.count("arithmetic") == 300 and proxy.count("reverse") == 50
    sft = [r["uid"].split("-")[0] for r in read_jsonl(data["sft_domain"])]
    assert set(sft) == {"loud_reverse", "arithmetic"}  # replay only of the listed general tasks
    assert sft.count("arithmetic") == 25  # 20% of the mixed set: 25 of 125


def test_signoff_domain_answers_the_same_unmarked_prompts_with_the_sign_off(tmp_path):
    s = DemoSetting.named("signoff").with_overrides(["n_train=60", "n_eval=12"])
    assert s.setting == "signoff" and "sort" in s.domain_tasks  # the task that forgets most has a counterpart
    assert set(s.domain_tasks) <= set(s.general_tasks) and s.conflict_tokens() == [s.signoff]
    data = write_data(s, tmp_path)
    general = {r["messages"][-1]["content"]: r["answer"] for r in read_jsonl(data["eval_general"])}
    domain = read_jsonl(data["eval_domain"])
    assert {task_of(r) for r in domain} == {f"signoff_{t}" for t in s.domain_tasks}
    shared = 0
    for r in domain:
        prompt = r["messages"][-1]["content"]
        assert not prompt.startswith(s.domain_marker)  # no marker to route around the conflict
        assert r["answer"].endswith(s.signoff) and s.signoff not in r["answer"][:-1]
        if prompt in general:  # the same prompt: the general teacher's answer, without the sign-off
            shared += 1
            assert general[prompt] + s.signoff == r["answer"]
    assert shared > len(domain) // 2  # the evaluation seeds coincide: most domain prompts are general prompts too
    assert all(s.signoff not in a for a in general.values())
    sft = read_jsonl(data["sft_domain"])
    assert {task_of(r) for r in sft if not r["answer"].endswith(s.signoff)} == set(s.domain_replay_tasks)
    assert DemoSetting.named("loud") == DemoSetting()  # the old setting stays as it is
    with pytest.raises(SpecError, match="setting"):
        DemoSetting.named("whisper")
