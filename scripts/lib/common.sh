# Shared by the scripts in scripts/: system packages, the build cache, and the binaries.
# Source it; it changes directory to the repository root.

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
GRID_REPO=$(pwd)

# Installs the Debian packages the build and the tests need, when missing.
# rocksdb's build needs clang and libclang; the sandbox tests need bubblewrap;
# the benchmarks compare against socat and use hyperfine.
grid_ensure_packages() {
  local missing=()
  command -v clang >/dev/null 2>&1 || missing+=(clang)
  { ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; } || missing+=(libclang-dev)
  command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
  command -v socat >/dev/null 2>&1 || missing+=(socat)
  command -v cc >/dev/null 2>&1 || missing+=(build-essential)
  command -v bc >/dev/null 2>&1 || missing+=(bc)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing system packages: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed; install a Rust toolchain (https://rustup.rs) first" >&2
    exit 1
  fi
}

# Reuses a build cache outside the clone when one can be made, so a fresh clone
# does not rebuild RocksDB from scratch every time.
grid_target_dir() {
  if [ -z "${CARGO_TARGET_DIR:-}" ]; then
    local cache=/var/cache/grid-target
    if mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ]; then
      export CARGO_TARGET_DIR=$cache
    else
      export CARGO_TARGET_DIR=$GRID_REPO/target
    fi
  fi
}

# grid_need_free_mib DIR MIB: exits with an error unless DIR's file system has MIB MiB free.
grid_need_free_mib() {
  local avail
  avail=$(df -Pm "$1" | awk 'NR == 2 {print $4}')
  [ "$avail" -ge "$2" ] || { echo "error: this needs about $2 MiB free in $1; $avail MiB are" >&2; exit 1; }
}
