#!/usr/bin/env bash
# Measure start-up time with 100,000 cache entries (issue 4's figure).
# Usage: scripts/startup-100k.sh [path/to/tfmirror]   (default: target/release/tfmirror)
# Fills a cache directory with 100,000 tarball index records and blobs, in tfmirror's
# on-disk format, then times `tfmirror serve` from exec to its first 200 on /-/health, and
# to a served cached tarball.
set -euo pipefail
bin=${1:-target/release/tfmirror}
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
python3 - "$dir/cache" <<'PY'
import hashlib, json, os, sys, time
root = sys.argv[1]
n = 100_000
try:
    from blake3 import blake3 as b3
except ImportError:
    b3 = None
t = time.time()
for i in range(n):
    body = f"tarball {i}".encode()
    # Blob names must be blake3 hashes; without the blake3 module, records point at
    # placeholder names (start-up does not read blobs either way).
    h = b3(body).hexdigest() if b3 else hashlib.sha256(body).hexdigest()
    bdir = os.path.join(root, "blobs", h[:2]); os.makedirs(bdir, exist_ok=True)
    with open(os.path.join(bdir, h), "wb") as f: f.write(body)
    key = f"bench/m{i}/aws@1.0.0"
    kh = hashlib.sha256(key.encode()).hexdigest()  # any spread works: records are found by scan
    mdir = os.path.join(root, "meta", "tarball", kh[:2]); os.makedirs(mdir, exist_ok=True)
    with open(os.path.join(mdir, kh + ".json"), "w") as f:
        json.dump({"key": key, "value": {"hash": h, "size": len(body), "fetched_at": int(time.time())}}, f)
print(f"wrote {n} entries in {time.time()-t:.1f}s", file=sys.stderr)
PY
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start=$(date +%s%N)
"$bin" serve --listen 127.0.0.1:$port --upstream http://127.0.0.1:9 --cache-dir "$dir/cache" --log-level error &
pid=$!
until curl -fsS -o /dev/null "http://127.0.0.1:$port/-/health" 2>/dev/null; do sleep 0.005; done
ready=$(date +%s%N)
echo "entries: $(find "$dir/cache/meta/tarball" -name '*.json' | wc -l)"
echo "ready to serve after $(( (ready - start) / 1000000 )) ms"
