"""The verify forward: each request's last token and its drafts run as rows of one DECODE batch.

Row j of a request with n drafts is the token at position kv_len + j: it writes its KV slot and
attends to the request's keys up to its own position, which is what the decode step that would
have produced it computes. So the rows go through the runner's ordinary decode step (compiled when
it is; no graph of its own, nothing padded to k drafts: a request without a draft is one plain
decode row). On CPU the compiled step streams each weight once for up to 8 rows (the gemv op,
kernels/csrc/gemv.cpp) and computes every row as batch 1 does, bit for bit. SmolLM2-135M's
linears in bfloat16 take 9.2-10.3 ms for 5 rows against 8.5 for one; a whole verify of 4 drafts
measured 1.8 decode steps inside the scheduler (RESULTS.md: the kernel stops streaming at
bandwidth from 4 rows). Past MAX_VERIFY_ROWS rows the linears turn into a GEMM and a verify costs
more than the tokens it saves: `draft_budget` keeps a verify within 16 rows.
"""

from __future__ import annotations

import torch

from research_rt.core.forward_batch import ForwardMode
from research_rt.core.req import Req

MAX_VERIFY_ROWS = 16


def draft_budget(num_reqs: int, num_drafted: int, k: int) -> int:
    """Drafts each drafted request may verify: at most k, within MAX_VERIFY_ROWS rows in all."""
    if not num_drafted:
        return 0
    return max(0, min(k, (MAX_VERIFY_ROWS - num_reqs) // num_drafted))


def verify_logits(runner, reqs: list[Req], drafts: list[list[int]]) -> torch.Tensor:
    """Logits [rows, vocab] (float32, CPU): per request in order, its last token's row, then one
    row per draft. The drafts' KV slots are already in each request's req_to_token row after
    kv_len (the last token's slot at kv_len)."""
    rows, starts, ids = [], [], []
    for req, draft in zip(reqs, drafts):
        for j, tok in enumerate([req.fill_ids[-1], *draft]):
            rows.append(req.req_pool_row)
            starts.append(req.kv_len + j)
            ids.append(tok)
    loc = runner.req_to_token.table[torch.tensor(rows), torch.tensor(starts)]
    batch = runner.make_rows_batch(ForwardMode.DECODE, rows, starts, [1] * len(rows), ids, loc)
    logits, _ = runner.forward(batch, torch.arange(len(rows)))
    return logits.float()
