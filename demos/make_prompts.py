"""Write the demo's held-out prompt set: function signatures from the stdlib files the models never saw.

    python demos/make_prompts.py > demos/heldout_prompts.jsonl
"""

import json
import re
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_target import stdlib_files  # noqa: E402

SIGNATURE = re.compile(r"^\s*(def \w+\(.*\)( -> [^:]+)?:)\s*$")

prompts = []
for path in stdlib_files()[1]:
    found = [m.group(1) for m in map(SIGNATURE.match, path.read_text().splitlines()) if m]
    prompts += found[:4]  # a few per file, so that every held-out file counts
for p in prompts[:32]:
    print(json.dumps({"prompt": p}))
