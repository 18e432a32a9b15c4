"""Engine, scheduler, requests, sampling parameters and detokenization."""
