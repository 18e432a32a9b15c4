"""Which requests may speculate, and how many drafted tokens a verify forward accepts.

The rule for a deterministic draft: at each verified position the target picks its token as in
normal decoding (argmax for greedy, a draw with the request's own parameters otherwise); drafts are
accepted while they equal the target's pick, and the pick at the first mismatch is emitted too.
Every emitted token is therefore exactly what normal decoding would have produced at its position
(greedy) or drawn from the same distribution (sampling).
"""

from __future__ import annotations

from research_rt.core.req import Req


def can_speculate(req: Req) -> bool:
    """Requests whose next-token distribution depends only on the logits of their position.
    Logprobs, grammars, logit processors, penalties (they depend on the output so far),
    min_new_tokens and interventions take a normal decode step instead."""
    sp = req.sampling
    return not (
        req.return_logprob
        or req.return_hidden_states
        or req.grammar is not None
        or req.logit_processor is not None
        or req.custom_logit_processor is not None
        or req.interventions is not None
        or sp.repetition_penalty != 1.0
        or sp.frequency_penalty
        or sp.presence_penalty
        or len(req.output_ids) < sp.min_new_tokens
    )


def accepted_run(targets: list[int], drafts: list[int]) -> list[int]:
    """The tokens to emit: the target's picks up to and including the first that differs from
    its draft (`targets[i]` is the pick after the input token i; drafts[i] was input i + 1)."""
    m = 0
    while m < len(drafts) and targets[m] == drafts[m]:
        m += 1
    return targets[: m + 1]
