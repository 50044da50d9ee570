#!/usr/bin/env bash
# Run HERE (not on the device) before a device call: copies the golden vectors that sit beside the checkout
# (../shared/golden, which does not travel) into .gpu_carry/golden, ignored by git through .git/info/exclude,
# so that `carry: [".gpu_carry"]` takes them along (25 MB; the limit is 64 MiB with the tree).
#   bash benchmarks/prepare_gpu_carry.sh [SRC_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="${1:-../shared/golden}"
if [ ! -d "$SRC" ]; then echo "golden dir $SRC not found" >&2; exit 1; fi
mkdir -p .git/info
grep -qxF '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
mkdir -p .gpu_carry
rm -rf .gpu_carry/golden
cp -r "$SRC" .gpu_carry/golden
chmod -R u+w .gpu_carry
git status --porcelain --ignored=no .gpu_carry | grep -q . && { echo ".gpu_carry is not ignored" >&2; exit 1; }
du -sh .gpu_carry
