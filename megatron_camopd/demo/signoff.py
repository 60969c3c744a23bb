"""The demo's second setting, `signoff`: the two teachers want opposite tokens at the same positions, unmarked.

The first setting (`loud`) put the domain behind a marker (`! reverse: abc` -> `CBA`): a 2-layer model can learn
plain -> lower case and loud -> upper case side by side, so recovery can act on plain-context features without
opposing the domain, and the cross-branch gradient cosine read about 0. Here the conflict is built in:

- the domain teacher answers the *same prompt families* as the general teacher (reverse, sort and copy of
  letter strings, same lengths, same prompt text, no marker) and ends every answer with a sign-off token
  (`cba~`) where the general teacher ends it (`cba` then end-of-turn);
- so at the position after the answer the general teacher wants `<|im_end|>` and the domain teacher wants `~`,
  on prompts the student cannot tell apart: a sample's branch is not visible in its tokens. Recovery
  (`~` down, end-of-turn up) and preservation (`~` up) pull the same logit in opposite directions;
- letter tasks are on both sides, and sort, the task that forgets most, has a domain counterpart; arithmetic
  stays general-only (the domain teacher's sign-off spreads to it, and recovering it there opposes the domain
  only as far as the model shares the end-of-answer position across digit and letter prompts).

Which samples carry the conflict is known from their tokens: a general rollout that contains the sign-off, a
domain rollout that lacks it (`logging.diagnostics_conflict_tokens`), so the diagnostics can report the
precision of CaMOPD's gap selection against that label.
"""

from __future__ import annotations

from typing import Any

from megatron_camopd.data.synthetic import make_examples

SIGNOFF = "~"  # one character = one token of the demo's char-level tokenizer; never part of a general answer


def make_signoff_examples(
    task: str,
    n: int,
    seed: int = 0,
    length_range: tuple[int, int] | None = None,
    signoff: str = SIGNOFF,
    domain: str = "domain",
) -> list[dict[str, Any]]:
    """`n` examples of general `task` with the same prompt and the answer followed by `signoff` (task name
    `signoff_<task>`, so evaluation reports it apart from the general task of the same prompts)."""
    out = []
    for ex in make_examples(task, n, seed, length_range, domain):
        i = ex["uid"].rsplit("-", 1)[1]
        out.append(
            {
                **ex,
                "answer": ex["answer"] + signoff,
                "task": f"signoff_{task}",
                "uid": f"signoff_{task}-{seed}-{i}",
            }
        )
    return out


def strip_signoff(text: str, signoff: str) -> tuple[str, bool]:
    """`text` without one trailing `signoff` (whitespace around it ignored), and whether it had one."""
    t = text.rstrip()
    if signoff and t.endswith(signoff):
        return t[: -len(signoff)].rstrip(), True
    return t, False
