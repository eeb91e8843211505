#!/usr/bin/env bash
# Installs what the build needs beyond the Rust toolchain, once: libclang for the
# bindgen step of the rocksdb crate. Idempotent; sourced by scripts/run and scripts/test.
set -euo pipefail
if ! ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9.]+)?\.so'; then
  echo "starkv: installing libclang-dev (needed to build RocksDB bindings)" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "starkv: cargo not found; install Rust from https://rustup.rs" >&2
  exit 1
fi
