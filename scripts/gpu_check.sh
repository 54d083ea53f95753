#!/usr/bin/env bash
# The GPU check (issue 16), on a machine with an NVIDIA GPU and PyTorch (the device tool's
# nvidia-h200): lqa on CUDA against lqa on the CPU (parity), then lqa's and PyTorch's times on
# the same GPU for the same work, side by side. About 5 minutes; needs no network.
#
# What travels: the default model (94 MiB) and the CUDA build of the check do not fit one device
# call (64 MiB with the working tree), so scripts/gpu_pack.sh, run beforehand on a machine
# without a GPU, cuts them into .gpu/c1, .gpu/c2, ... and writes .gpu/PLAN.txt, the exact calls.
# With a 13 MiB tree that is three calls, each right after the one before (a device machine
# stays warm about 30 s), each the same command:
#
#   scripts/gpu_pack.sh && cat .gpu/PLAN.txt          # here, first (builds with CUDA)
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu/c1"], timeout_s=120)
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu/c2"], timeout_s=120)
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu/c3"], timeout_s=570)
#   give_back()
#
# Each call copies what it carried into /tmp/lqa-gpu/stage (outside the repository, so it stays
# while the machine is warm); the call that completes the set (checked against MANIFEST) runs
# the check. A call that finds pieces missing after the last one says which and exits 3.
#
# The check: build/gpu_check (the CUDA build of examples/gpu_check.rs) with the model in
# LQA_HOME=/tmp/lqa-gpu/home, then scripts/gpu_torch_timing.py on the model it exports; output
# in $OUT (lqa.json, torch.json, lqa.log, torch.log, summary.txt) when the tool sets OUT.
# Exit status: 0 parity holds, 1 parity failed, 2 could not run, 3 pieces missing.
#
# A dry run without a GPU (after scripts/gpu_pack.sh, both payloads in place, the stub libcuda
# of scripts/cuda_setup.sh standing in for the driver's, a Python with torch/transformers/peft):
#   LQA_GPU_DRY=1 LD_LIBRARY_PATH=DIR_WITH_libcuda.so.1 PYTHON=... bash scripts/gpu_check.sh
# runs lqa with --device cpu --generic (parity only) and PyTorch on the CPU, one run each.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
W=/tmp/lqa-gpu
STAGE=$W/stage
OUTDIR="${OUT:-$W/out}"
mkdir -p "$STAGE" "$OUTDIR"
say() { echo "[gpu_check] $*"; }

# 1. stage what this call carried
shopt -s nullglob
for d in .gpu/c*/; do
  say "staging $d: $(ls "$d" | tr '\n' ' ')"
  cp -f "$d"* "$STAGE/"
done
[[ -f "$STAGE/MANIFEST" ]] || { say "nothing staged yet (no .gpu/cN carried): see scripts/gpu_pack.sh"; exit 3; }
missing=()
while read -r _ f; do [[ -f "$STAGE/$f" ]] || missing+=("$f"); done < "$STAGE/MANIFEST"
if ((${#missing[@]})); then
  say "staged; still missing: ${missing[*]} (make the next call now; if none is left, the machine was lost between calls: redo them all)"
  exit 3
fi
(cd "$STAGE" && sha256sum --quiet -c MANIFEST) || { say "a staged piece is corrupt"; exit 2; }
say "all pieces here"

# 2. assemble: the model into an lqa cache, the binary
MODEL_DIR=$W/home/models/smollm2-135m-instruct
mkdir -p "$MODEL_DIR" "$W/bin"
GGUF=$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
cat "$STAGE"/model.gguf.part* > "$GGUF"
cp "$STAGE/model.gguf.sha256" "$GGUF.sha256"
(cd "$MODEL_DIR" && sha256sum --quiet -c "$(basename "$GGUF").sha256") || { say "model sha256 mismatch"; exit 2; }
if command -v xz > /dev/null; then
  xz -dc "$STAGE/gpu_check.xz" > "$W/bin/gpu_check"
else
  python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$STAGE/gpu_check.xz" > "$W/bin/gpu_check"
fi
chmod +x "$W/bin/gpu_check"
export LQA_HOME=$W/home HF_HUB_OFFLINE=1

# 3. the CUDA libraries the binary links (cuBLAS, cuRAND, NVRTC, cudart from CUDA 13; the
#    driver's libcuda): the system toolkit's, PyTorch's wheels', the driver's folder
PY="${PYTHON:-python3}"
pylibs() {
  "$PY" - <<'PY' 2>/dev/null || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
try:
    import nvidia
    roots += list(nvidia.__path__)
except Exception:
    pass
seen = set()
for r in roots:
    for p in sorted(glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)):
        if p not in seen and glob.glob(os.path.join(p, "lib*.so*")):
            seen.add(p)
            print(p)
PY
}
libdirs=()
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 \
  /usr/local/cuda/targets/x86_64-linux/lib $(pylibs); do
  if [[ -d "$d" ]]; then libdirs+=("$d"); fi
done
LD_LIBRARY_PATH="$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
deps="$(ldd "$W/bin/gpu_check" 2>&1 || true)"
if [[ "$deps" == *"not found"* ]]; then
  say "libraries not found:"; grep "not found" <<< "$deps" || true
  say "searched: $LD_LIBRARY_PATH"; exit 2
fi
grep -E "cuda|cublas|curand|nvrtc" <<< "$deps" | sed 's/^/    /' || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/[gpu_check] GPU: /' || true

# 4. lqa: parity against the CPU, timings, and the export for PyTorch
say "lqa (parity on cuda against the CPU, then timings)"
set +e
if [[ "${LQA_GPU_DRY:-0}" == 1 ]]; then
  LQA_ARGS=(--device cpu --generic --skip-timing); PT_ARGS=(--device cpu --runs 1 --warmup 0 --benches train,read,control)
else
  LQA_ARGS=(--device cuda); PT_ARGS=()
fi
timeout 330 "$W/bin/gpu_check" "${LQA_ARGS[@]}" --out "$OUTDIR/lqa.json" --export "$W/export" 2>&1 | tee "$OUTDIR/lqa.log"
lqa_rc=${PIPESTATUS[0]}
set -e
say "lqa exit status $lqa_rc"

# 5. PyTorch on the same GPU, same weights, same ids
torch_rc=2
if [[ -f "$W/export/ids.json" && "${LQA_GPU_SKIP_TORCH:-0}" != 1 ]]; then
  say "PyTorch"
  set +e
  PYTHONUNBUFFERED=1 timeout 240 "$PY" scripts/gpu_torch_timing.py --dir "$W/export" "${PT_ARGS[@]}" \
    --out "$OUTDIR/torch.json" 2>&1 |
    grep --line-buffered -v -E "^\s*$" | tee "$OUTDIR/torch.log"
  torch_rc=${PIPESTATUS[0]}
  set -e
  say "PyTorch exit status $torch_rc"
fi

# 6. side by side
python3 - "$OUTDIR/lqa.json" "$OUTDIR/torch.json" <<'EOF' | tee "$OUTDIR/summary.txt"
import json, os, sys
def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except Exception:
        return {}
lqa, pt = load(sys.argv[1]), load(sys.argv[2])
print()
print("== summary")
if lqa:
    print(f"parity on cuda: {'PASS' if lqa.get('parity_pass') else 'FAIL'} "
          f"({lqa.get('parity_failed')} failed of {len(lqa.get('checks', []))}; bf16 tolerance {lqa.get('bf16_logit_tol')})")
    for c in lqa.get("checks", []):
        print(f"  [{'ok' if c['pass'] else 'FAIL'}] {c['check']}: {c['detail']}")
if pt:
    print(f"PyTorch {pt['versions']['torch']}, transformers {pt['versions']['transformers']}, peft {pt['versions']['peft']} on {pt.get('gpu')}")
    print(f"PyTorch top-5 equal to lqa's on cuda, per prompt: {pt.get('top5_equal_lqa')}")
L = {r["bench"]: r for r in lqa.get("timings", [])}
P = {r["bench"]: r for r in pt.get("timings", [])}
goals = {"train_step": ("time", 0.7), "decode_f32": ("speed", 1.5)}
print()
print(f"{'benchmark':<16} {'lqa':>22} {'PyTorch':>22} {'lqa vs PyTorch':>16}  goal")
for b in ["prefill_f32", "decode_f32", "prefill_bf16", "decode_bf16", "train_step",
          "control_step_b1", "control_step_b4", "read_generate"]:
    l, p = L.get(b), P.get(b)
    def cell(r):
        if not r:
            return "-"
        s = f"{r['median_s'] * 1000:.1f} ms"
        if "tokens_per_s" in r:
            s += f" ({r['tokens_per_s']:.0f} tok/s)"
        return s
    ratio, goal = "-", ""
    if l and p:
        t = l["median_s"] / p["median_s"]
        ratio = f"{t:.2f}x time"
        if b in goals:
            kind, g = goals[b]
            if kind == "time":
                goal = f"<= {g}x time: {'met' if t <= g else 'NOT met'}"
            else:
                goal = f">= {g}x speed: {'met' if 1 / t >= g else 'NOT met'} ({1 / t:.2f}x)"
    print(f"{b:<16} {cell(l):>22} {cell(p):>22} {ratio:>16}  {goal}")
EOF
if ((lqa_rc == 0)); then exit 0; elif ((lqa_rc == 1)); then exit 1; else exit 2; fi
