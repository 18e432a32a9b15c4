"""N-gram (prompt-lookup) speculative decoding: drafts from each request's own tokens (ngram.py),
the acceptance rule (accept.py) and the verify forward (verify.py). The scheduler glue lives in
scheduler/speculative.py."""
