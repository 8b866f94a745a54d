#!/usr/bin/env python3
"""Fixed waits in the integration tests: every `sleep(` in tests/*.rs (not tests/common) with
a literal duration of at least 150 ms, their count and total, and the sleeps whose duration is
not a literal (constants such as IDLE, CHECK_EVERY), listed for review.

    scripts/fixed-sleeps.py [DIR]    (default: tests)
"""
import glob
import os
import re
import sys

LIT = re.compile(r"sleep\((?:Duration|std::time::Duration)::from_(millis|secs)\((\d+)\)\)")
root = sys.argv[1] if len(sys.argv) > 1 else "tests"
count, total_ms, other = 0, 0, []
for path in sorted(glob.glob(os.path.join(root, "*.rs"))):
    for n, line in enumerate(open(path), 1):
        if "sleep(" not in line or line.strip().startswith("//"):
            continue
        m = LIT.search(line)
        if not m:
            other.append(f"{path}:{n}: {line.strip()}")
            continue
        ms = int(m.group(2)) * (1000 if m.group(1) == "secs" else 1)
        if ms >= 150:
            count += 1
            total_ms += ms
            print(f"{path}:{n}: {ms} ms")
print(f"fixed waits >= 150 ms: {count}, {total_ms / 1000:.1f} s in all")
print(f"sleeps with a non-literal duration ({len(other)}):")
for o in other:
    print("  " + o)
