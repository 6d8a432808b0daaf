"""speculative.py - speculative decoding from Python: a draft model proposes,
the target verifies (greedy, so the text is the target's own).

    python examples/speculative.py target.gguf draft.gguf ["The capital of France is"]

Runs from the clone's root as printed: Python puts this file's folder, not the
root, first on the import path, so `import pymoe` finds the installed package."""
import sys

import pymoe

if len(sys.argv) < 3:
    sys.exit(f"usage: python {sys.argv[0]} TARGET.gguf DRAFT.gguf [PROMPT]")
prompt = sys.argv[3] if len(sys.argv) > 3 else "The capital of France is"

with pymoe.Model(sys.argv[1]) as target, pymoe.Model(sys.argv[2]) as draft:
    with pymoe.Speculative(target, draft, draft_max="auto", temperature=0, n_ctx=4096) as spec:
        for t in spec.generate(prompt, max_tokens=64, stop=["\n\n"]):
            print(t.text, end="", flush=True)
        print(f"\nacceptance {spec.stats.acceptance:.0%}", file=sys.stderr)
