"""The demo's synthetic setting: the proxy prompts cover the general tasks incompletely, as configured."""

from __future__ import annotations

import json

from megatron_camopd.demo.setting import DemoSetting, proxy_label, write_data


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_proxy_uses_shifted_lengths_and_task_subset(tmp_path):
    s = DemoSetting(n_train=40, n_eval=10, general_tasks={"reverse": [3, 6], "copy": [3, 6], "sort": [3, 5]},
                    proxy_tasks=["reverse", "copy"], proxy_lengths={"reverse": [3, 4]})
    data = write_data(s, tmp_path)
    proxy = _rows(data["proxy_general"])
    tasks = {r["uid"].split("-")[0] for r in proxy}
    assert tasks == {"reverse", "copy"}  # sort is held out of the proxy
    rev = [len(r["answer"]) for r in proxy if r["uid"].startswith("reverse")]
    cp = [len(r["answer"]) for r in proxy if r["uid"].startswith("copy")]
    assert max(rev) == 4 and min(rev) == 3  # shifted lengths for reverse ...
    assert max(cp) > 4  # ... the full range for copy
    ev = [len(r["answer"]) for r in _rows(data["eval_general"]) if r["uid"].startswith("reverse")]
    assert max(ev) > 4  # the evaluation covers lengths the proxy never shows
    assert proxy_label(s, "reverse") == "proxy, lengths 3-4 of 3-6"
    assert proxy_label(s, "copy") == "proxy"
    assert proxy_label(s, "sort") == "not in proxy"
