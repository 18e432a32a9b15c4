"""Custom logit processors, as SGLang has them, and the offline Engine's plain Python hook.

Over HTTP (server started with `--enable-custom-logit-processor`), a request carries a serialized
processor class in `custom_logit_processor` and its per-request parameters in
`sampling_params.custom_params`:

    class ForceToken(CustomLogitProcessor):
        def __call__(self, logits, custom_param_list):
            for i, params in enumerate(custom_param_list):
                logits[i, :] = -float("inf")
                logits[i, params["token_id"]] = 0.0
            return logits

    requests.post(url + "/generate", json={"text": "Hi", "custom_logit_processor": ForceToken.to_str(),
                  "sampling_params": {"custom_params": {"token_id": 5}}})

`to_str()` is SGLang's format (`{"callable": <dill-pickled class, hex>}`), so processors written
for SGLang work unchanged. dill pickles a class by value only when it is defined in `__main__` (a
script, a notebook); a class from an importable module is pickled by reference, so the server must
be able to import that module. Before sampling, the rows of a batch that share a processor string are
passed to it together: `logits` is those rows ([k, vocab], edit in place or return a new tensor),
`custom_param_list[i]` is row i's `custom_params` plus `"__req__"` (the `Req`: `input_ids`,
`output_ids`, ...). Deserializing runs code from the request: that is why the server flag exists.

Offline, `Engine.generate(..., logit_processor=fn)` takes any Python callable
`fn(logits_row: Tensor[vocab], req: Req) -> Tensor[vocab]`, applied to each of the call's requests.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Any

import torch

from research_rt.core.errors import RequestError
from research_rt.core.req import Req, abort_reason

DISABLED_MESSAGE = (
    "The server is not configured to enable custom logit processor. "
    "Please set `--enable-custom-logit-processor` to enable this feature."
)


class CustomLogitProcessor(ABC):
    """Base class of serializable processors (SGLang's interface)."""

    @abstractmethod
    def __call__(
        self, logits: torch.Tensor, custom_param_list: list[dict[str, Any]] | None = None
    ) -> torch.Tensor:
        """Return the processed logits of the rows that use this processor."""

    @classmethod
    def to_str(cls) -> str:
        import dill

        return json.dumps({"callable": dill.dumps(cls).hex()})

    @classmethod
    def from_str(cls, json_str: str) -> CustomLogitProcessor:
        return _load(json_str)()


@lru_cache(maxsize=64)
def _load(json_str: str) -> Any:
    import dill

    return dill.loads(bytes.fromhex(json.loads(json_str)["callable"]))


def load_processor(json_str: str) -> Any:
    """Deserialize a request's processor (400 with the reason when it cannot be loaded)."""
    try:
        proc = CustomLogitProcessor.from_str(json_str)
    except Exception as e:  # noqa: BLE001 - anything the client sent that does not load
        raise RequestError(f"custom_logit_processor could not be deserialized: {e!r:.300}") from e
    if not callable(proc):
        raise RequestError("custom_logit_processor must deserialize to a callable class.")
    return proc


def apply_logit_processors(logits: torch.Tensor, reqs: list[Req]) -> None:
    """Run the Python hooks and the serialized processors of `reqs` on `logits` (in place)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(reqs):
        if r.logit_processor is not None:
            logits[i] = r.logit_processor(logits[i], r)
        if r.custom_logit_processor is not None:
            groups.setdefault(r.custom_logit_processor[0], []).append(i)
    for rows in groups.values():
        proc = reqs[rows[0]].custom_logit_processor[1]
        params = [{**(reqs[i].sampling.custom_params or {}), "__req__": reqs[i]} for i in rows]
        idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        try:
            logits[idx] = proc(logits[idx], params)
        except Exception as e:  # noqa: BLE001 - the client's code: fail its requests, not the batch
            for i in rows:  # the scheduler finishes them after this step's token
                reqs[i].to_abort = abort_reason(f"custom_logit_processor failed: {e!r:.300}", 400)
