#!/usr/bin/env bash
# Prepare the GPU check for the device tool, on this machine (no GPU needed): build the check
# program with CUDA, strip and compress it, and cut it and the default model into payloads that
# each fit one device call beside the working tree (the tool sends at most 64 MiB a call; the
# model alone is 94 MiB). Writes .gpu/c1, .gpu/c2, ... (git-ignored) and .gpu/PLAN.txt, the exact
# device calls to make, in order, each right after the last (a machine stays warm ~30 s):
#
#   scripts/gpu_pack.sh            # builds into target-cuda/ (slow the first time: nvcc)
#   cat .gpu/PLAN.txt
#
# Every call runs `bash scripts/gpu_check.sh`: it stages what the call carried into /tmp on the
# device machine, and runs the check once every piece is there (see that script's header).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((1024 * 1024))

if [[ "${LQA_GPU_SKIP_BUILD:-0}" != 1 ]]; then
  eval "$(scripts/cuda_setup.sh --env)"
  echo "building the check with CUDA into $CARGO_TARGET_DIR ..." >&2
  cargo build --release --features cuda --example gpu_check
fi
BIN="${CARGO_TARGET_DIR:-$ROOT/target-cuda}/release/examples/gpu_check"
[[ -x "$BIN" ]] || { echo "error: no $BIN (build it first)" >&2; exit 1; }

# the default model, as lqa caches it ($LQA_HOME, default ~/.cache/lqa); fetched if missing
LQA_HOME_DIR="${LQA_HOME:-$HOME/.cache/lqa}"
GGUF="$LQA_HOME_DIR/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -f "$GGUF" || ! -f "$GGUF.sha256" ]]; then
  echo "fetching the default model ..." >&2
  # the CPU build (the CUDA one needs the driver's libcuda to start)
  env -u CARGO_TARGET_DIR -u NVCC cargo run --release --quiet -- pull smollm2-135m-instruct >&2
fi
[[ -f "$GGUF" && -f "$GGUF.sha256" ]] || { echo "error: no $GGUF" >&2; exit 1; }

rm -rf .gpu
mkdir -p .gpu/all
strip -o .gpu/all/gpu_check "$BIN"
xz -T2 -6 -c .gpu/all/gpu_check > .gpu/all/gpu_check.xz
rm .gpu/all/gpu_check
cp "$GGUF.sha256" .gpu/all/model.gguf.sha256

# what travels anyway: tracked files and untracked files git does not ignore
TREE=$( (git ls-files -z; git ls-files -z -o --exclude-standard) | xargs -0 -r stat -c %s -- 2>/dev/null |
  awk '{s += $1} END {print s + 0}')
CAP=$((LIMIT - TREE - MARGIN))
echo "working tree $((TREE / 1024)) KiB; room for $((CAP / 1024)) KiB a call" >&2
((CAP > 8 * 1024 * 1024)) || { echo "error: the working tree leaves too little room a call" >&2; exit 1; }

# the model in pieces of at most CAP bytes; the binary and sidecar ride in the last call
split -b "$CAP" -d -a 2 "$GGUF" .gpu/all/model.gguf.part
SMALL=$(( $(stat -c %s .gpu/all/gpu_check.xz) + $(stat -c %s .gpu/all/model.gguf.sha256) ))
((SMALL < CAP)) || { echo "error: the compressed binary ($SMALL bytes) does not fit a call" >&2; exit 1; }
(cd .gpu/all && sha256sum gpu_check.xz model.gguf.sha256 model.gguf.part* > MANIFEST)

# fill calls in order: model pieces first, then the small files where they fit
call=1; used=0
place() {  # place FILE into the current call, or the next one when it does not fit
  local f="$1" n; n=$(stat -c %s ".gpu/all/$f")
  if ((used + n > CAP)); then call=$((call + 1)); used=0; fi
  mkdir -p ".gpu/c$call"; mv ".gpu/all/$f" ".gpu/c$call/"; used=$((used + n))
}
for f in $(cd .gpu/all && ls model.gguf.part*); do place "$f"; done
place gpu_check.xz
place model.gguf.sha256
for d in .gpu/c*; do cp .gpu/all/MANIFEST "$d/"; done
N=$call
rm -rf .gpu/all

{
  echo "GPU check payload, made $(date -u +%FT%TZ) from commit $(git rev-parse --short HEAD) (tree $((TREE / 1024)) KiB)"
  echo "Make these device calls in order, each right after the one before (a machine stays warm"
  echo "about 30 s between calls; if one reports missing pieces, the machine was lost: redo them all):"
  echo
  for ((i = 1; i <= N; i++)); do
    if ((i < N)); then t=120; else t=570; fi
    echo "  run(command=\"bash scripts/gpu_check.sh\", carry=[\".gpu/c$i\"], timeout_s=$t)"
  done
  echo
  echo "then give_back. Sizes:"
  for ((i = 1; i <= N; i++)); do echo "  .gpu/c$i: $(du -sk .gpu/c$i | cut -f1) KiB: $(ls .gpu/c$i | grep -v MANIFEST | tr '\n' ' ')"; done
} > .gpu/PLAN.txt
cat .gpu/PLAN.txt
