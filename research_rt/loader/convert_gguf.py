"""`python -m research_rt.loader.convert_gguf [FILE.gguf ...]`: convert GGUF files into the cache
now (gguf_cache.py; default: the embedded model). `make install` runs it, so that the first
`make serve` after a clean clone starts in seconds instead of converting for ~30 s first."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from research_rt.loader.gguf_cache import converted_dir
from research_rt.loader.resolve import default_model_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="*", help="GGUF files (default: the embedded SmolLM2)")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    for file in parser.parse_args(argv).files or [default_model_path()]:
        print(converted_dir(Path(file)))


if __name__ == "__main__":
    main()
