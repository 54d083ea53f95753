#!/usr/bin/env bash
# Bring what `cargo build --release --features cuda` needs onto a machine with no CUDA installed
# and no GPU: nvcc and the CUDA headers and libraries, as wheels from the Python package index,
# unpacked into .cuda/ (git-ignored), plus a stub libcuda.so to link against (the real one comes
# with the driver on the GPU machine). Prints the environment to export; `--env` prints only that,
# so `eval "$(scripts/cuda_setup.sh --env)"` sets it up in one line.
#
# Versions: CUDA 13.0, the version the lent H200's driver (580.x) runs. PTX from a newer nvcc
# (13.1+) would not load on that driver; cuBLAS & co. are linked by soname (libcublas.so.13, ...)
# and found at run time in the GPU machine's own CUDA 13 libraries (PyTorch's wheels carry them).
# CUDA_COMPUTE_CAP=90 (Hopper): there is no GPU here for candle's build to ask.
#
#   scripts/cuda_setup.sh                   # install (idempotent), print the exports
#   eval "$(scripts/cuda_setup.sh --env)"
#   CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${LQA_CUDA_DIR:-$ROOT/.cuda}"
CUDA_ROOT_DIR="$DEST/site/nvidia/cu13"
ENV_ONLY=0
[[ "${1:-}" == "--env" ]] && ENV_ONLY=1

PACKAGES=(
  nvidia-cuda-nvcc==13.0.88      # nvcc, ptxas, fatbinary, nvlink
  nvidia-nvvm==13.0.88           # cicc and libdevice (nvcc's front end)
  nvidia-cuda-crt==13.0.88       # crt/ headers nvcc includes
  nvidia-cuda-runtime==13.0.96   # cuda_runtime.h, cuda_fp16/bf16.h, libcudart.so.13
  nvidia-cuda-cccl==13.0.85      # cub/thrust/libcu++ headers
  nvidia-cuda-nvrtc==13.0.88     # libnvrtc.so.13 (cudarc links it)
  nvidia-curand==10.4.0.35       # libcurand.so.10 (cudarc links it)
  nvidia-cublas==13.0.2.14       # libcublas.so.13, libcublasLt.so.13 (cudarc links them)
)

log() { [[ $ENV_ONLY == 1 ]] && echo "# $*" >&2 || echo "$*" >&2; }

if [[ ! -x "$CUDA_ROOT_DIR/bin/nvcc" || ! -e "$DEST/.done" ]]; then
  log "installing CUDA 13.0 build tools into $DEST (about 700 MB of wheels)"
  rm -rf "$DEST/site"
  mkdir -p "$DEST"
  PY="${PYTHON:-python3}"
  "$PY" -m pip install --quiet --no-deps --disable-pip-version-check \
    --target "$DEST/site" "${PACKAGES[@]}" >&2
  [[ -x "$CUDA_ROOT_DIR/bin/nvcc" ]] || { echo "error: no nvcc in $CUDA_ROOT_DIR/bin" >&2; exit 1; }

  # The toolkit's usual shape: lib64 beside lib, unversioned .so names for the linker.
  ln -sfn lib "$CUDA_ROOT_DIR/lib64"
  for so in "$CUDA_ROOT_DIR"/lib/lib*.so.*; do
    base="$(basename "$so")"
    ln -sfn "$base" "$CUDA_ROOT_DIR/lib/${base%%.so.*}.so"
  done

  # A stub libcuda.so (soname libcuda.so.1, like the toolkit's lib/stubs): every driver entry
  # point cudarc declares, as an empty function. Only for linking; never on LD_LIBRARY_PATH.
  CUDARC_SYS="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1 || true)"
  if [[ -z "$CUDARC_SYS" ]]; then
    (cd "$ROOT" && cargo fetch --quiet)
    CUDARC_SYS="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)"
  fi
  mkdir -p "$CUDA_ROOT_DIR/lib/stubs"
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC_SYS" | sed 's/^pub unsafe fn //' | sort -u |
    sed 's/.*/void &(void) {}/' > "$DEST/libcuda_stub.c"
  ${CC:-cc} -shared -fPIC -o "$CUDA_ROOT_DIR/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 \
    "$DEST/libcuda_stub.c"
  touch "$DEST/.done"
  log "installed: $("$CUDA_ROOT_DIR/bin/nvcc" --version | grep release)"
fi

# nvcc as candle-kernels' build calls it. candle-kernels also builds a static library of GGUF
# quantized and MoE matmul kernels (llama.cpp's mmq/mmvq, 15 heavy files: hours of nvcc on two
# cores). lqa never runs them (it dequantizes GGUF weights at load time), so by default this
# wrapper compiles those files as stubs that abort if ever called, and passes every other call to
# nvcc unchanged. LQA_CUDA_FULL_KERNELS=1 builds them for real.
mkdir -p "$DEST/bin"
cat > "$DEST/bin/nvcc-lqa" <<'WRAP'
#!/usr/bin/env bash
set -euo pipefail
real="$(dirname "$0")/../site/nvidia/cu13/bin/nvcc"
src="${*: -1}"
case "$src" in
  *mmq_gguf/*.cu|*moe/*.cu|*mmvq_gguf.cu) ;;
  *) exec "$real" "$@" ;;
esac
out=""; prev=""
for a in "$@"; do [[ "$prev" == "-o" ]] && out="$a"; prev="$a"; done
stub="$(mktemp --suffix=.cu)"
trap 'rm -f "$stub"' EXIT
echo '#include <cstdio>' > "$stub"
echo '#include <cstdlib>' >> "$stub"
# every entry point candle declares (ffi.rs), defined once, in the stub of mmvq_gguf.cu
if [[ "$src" == *mmvq_gguf.cu ]]; then
  ffi="$(dirname "$src")/ffi.rs"
  [[ -f "$ffi" ]] || ffi="src/ffi.rs"
  for f in $(grep -oE 'pub fn [A-Za-z0-9_]+' "$ffi" | sed 's/pub fn //' | sort -u); do
    echo "extern \"C\" int $f() { fprintf(stderr, \"candle-kernels: $f was built as a stub (scripts/cuda_setup.sh; LQA_CUDA_FULL_KERNELS=1 builds it)\\n\"); abort(); }" >> "$stub"
  done
fi
exec "$real" -c -o "$out" -Xcompiler -fPIC "$stub"
WRAP
chmod +x "$DEST/bin/nvcc-lqa"
if [[ "${LQA_CUDA_FULL_KERNELS:-0}" == 1 ]]; then
  NVCC_LINE='unset NVCC'
else
  NVCC_LINE="export NVCC=\"$DEST/bin/nvcc-lqa\""
fi

cat <<EOF
export CUDA_ROOT="$CUDA_ROOT_DIR"
export CUDA_PATH="$CUDA_ROOT_DIR"
export CUDA_HOME="$CUDA_ROOT_DIR"
export PATH="$CUDA_ROOT_DIR/bin:$CUDA_ROOT_DIR/nvvm/bin:\$PATH"
export LIBRARY_PATH="$CUDA_ROOT_DIR/lib:$CUDA_ROOT_DIR/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=90
export CARGO_TARGET_DIR="$ROOT/target-cuda"
$NVCC_LINE
EOF
if [[ $ENV_ONLY == 0 ]]; then
  cat >&2 <<EOF

Then:  cargo build --release --features cuda        (into target-cuda/, not target/)
EOF
fi
