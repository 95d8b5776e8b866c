# Shared by the scripts in scripts/: system packages, the build cache, and the binaries.
# Source it; it changes directory to the repository root.

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
GRID_REPO=$(pwd)

# Installs the Debian packages the build and the tests need, when missing.
# rocksdb's build needs clang and libclang; the sandbox tests need bubblewrap; the NAT lab
# needs iproute2, iptables and procps (as root); the runner tests need googletest, g++ and pytest;
# the benchmarks compare against socat and use hyperfine; the DAG-CBOR check needs python3-venv;
# the status page's test needs chromium.
grid_ensure_packages() {
  local missing=()
  command -v clang >/dev/null 2>&1 || missing+=(clang)
  { ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; } || missing+=(libclang-dev)
  command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
  # The NAT lab (tests/nat_lab.rs) runs as root only: network namespaces (`ip netns`), iptables
  # NAT routers, sysctl for forwarding; coreutils' `timeout` and bash probe TCP in it.
  if [ "$(id -u)" -eq 0 ]; then
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    { command -v iptables >/dev/null 2>&1 && command -v iptables-restore >/dev/null 2>&1; } || missing+=(iptables)
    command -v sysctl >/dev/null 2>&1 || missing+=(procps)
  fi
  command -v socat >/dev/null 2>&1 || missing+=(socat)
  command -v cc >/dev/null 2>&1 || missing+=(build-essential)
  command -v bc >/dev/null 2>&1 || missing+=(bc)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  # The test runners' end-to-end tests build a googletest suite and run a pytest one.
  [ -f /usr/include/gtest/gtest.h ] || missing+=(libgtest-dev)
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  python3 -c 'import pytest' >/dev/null 2>&1 || missing+=(python3-pytest)
  # The DAG-CBOR interoperability test (protocol/tests/dag_cbor_interop.rs) pip-installs the
  # Python dag-cbor package into a virtual environment of its own.
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  # The status page's end-to-end test watches a job's page in headless Chromium.
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "== installing the system packages grid's build and tests need: ${missing[*]}" >&2
    echo "   (${sudo:+sudo }apt-get update, then apt-get install; usually a minute or two)" >&2
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
    echo "   installed ${missing[*]}" >&2
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

# grid_build [CARGO BUILD ARGS...]: builds grid's binaries (cargo build --workspace --bins
# --locked ARGS) into $CARGO_TARGET_DIR, saying first what it builds and how long that takes.
# With a warm cache it prints one line and builds quietly; otherwise it shows cargo's progress
# (a bar on a terminal, its "Compiling ..." lines in a log).
grid_build() {
  grid_build_notice "grid's binaries (grid, grid-node)"
  if [ "$GRID_BUILD_WARM" = 1 ]; then
    cargo build --workspace --bins --locked -q "$@"
  else
    cargo build --workspace --bins --locked "$@"
  fi
}

# grid_build_notice WHAT [COLD]: says on stderr what is about to be built into
# $CARGO_TARGET_DIR and roughly how long it takes (COLD: what an empty cache costs, as words;
# measured on 2 cores); sets GRID_BUILD_WARM=1 when grid's binaries are already built there (a
# build then takes seconds).
grid_build_notice() {
  local what=$1 cold=${2:-"about 15 minutes on 2 cores, most of it RocksDB's C++ (librocksdb-sys)"} cores
  cores=$(nproc 2>/dev/null || echo "?")
  GRID_BUILD_WARM=0
  if [ -x "$CARGO_TARGET_DIR/debug/grid" ] && [ -x "$CARGO_TARGET_DIR/debug/grid-node" ]; then
    GRID_BUILD_WARM=1
    echo "== building $what with the warm build cache in $CARGO_TARGET_DIR (seconds)" >&2
  elif compgen -G "$CARGO_TARGET_DIR/debug/build/librocksdb-sys-*/out/librocksdb.a" >/dev/null; then
    echo "== building $what into $CARGO_TARGET_DIR" >&2
    echo "   RocksDB is already built in this cache, so this takes a few minutes." >&2
  else
    echo "== building $what into $CARGO_TARGET_DIR" >&2
    echo "   This cache is empty, so every dependency is compiled first: $cold." >&2
    echo "   (This machine has $cores cores.)" >&2
    echo "   Later builds reuse the cache and take seconds." >&2
  fi
}

# grid_need_free_mib DIR MIB: exits with an error unless DIR's file system has MIB MiB free.
grid_need_free_mib() {
  local avail
  avail=$(df -Pm "$1" | awk 'NR == 2 {print $4}')
  [ "$avail" -ge "$2" ] || { echo "error: this needs about $2 MiB free in $1; $avail MiB are" >&2; exit 1; }
}
