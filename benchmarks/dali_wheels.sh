#!/usr/bin/env bash
# NVIDIA DALI on a GPU machine with no package registry: the wheels (nvidia-dali-cuda130 ~199 MB,
# nvidia-nvimgcodec-cu13 ~25 MB, nvidia-libnvcomp-cu13 ~30 MB) exceed what one device call carries (64 MiB),
# so they travel in chunks to one warm machine, which keeps ignored files between calls.
#
#   here:   benchmarks/dali_wheels.sh prepare        # download for CPython 3.12 / manylinux x86_64, split
#           benchmarks/dali_wheels.sh calls          # the carry list of each device call, one line per call
#   there:  (each call carries its chunk, e.g. carry [".whl/chunks/00", ".whl/manifest"])
#           benchmarks/dali_wheels.sh install        # after the last chunk: reassemble, verify, pip install
#
# Everything lives under .whl/ (ignored by git). `install` checks every wheel's sha256 against the manifest
# and names the chunks still missing instead of installing a torn wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.whl
CHUNK_MB=${CHUNK_MB:-56}  # a chunk and the working tree travel together (64 MiB a call)
PACKAGES=${DALI_PACKAGES:-"nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13"}
PYVER=${DALI_PYTHON:-3.12}

case "${1:-}" in
prepare)
  rm -rf "$DIR" && mkdir -p "$DIR/wheels" "$DIR/chunks"
  # shellcheck disable=SC2086
  python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$DIR/wheels" $PACKAGES
  cat "$DIR"/wheels/*.whl > "$DIR/all.bin"
  split -b "${CHUNK_MB}M" -d -a 2 "$DIR/all.bin" "$DIR/chunks/"
  rm "$DIR/all.bin"
  { for w in "$DIR"/wheels/*.whl; do echo "wheel $(basename "$w") $(stat -c %s "$w") $(sha256sum "$w" | cut -c1-64)"; done
    for c in "$DIR"/chunks/*; do echo "chunk $(basename "$c") $(stat -c %s "$c") $(sha256sum "$c" | cut -c1-64)"; done
  } > "$DIR/manifest"
  echo "$(ls "$DIR/chunks" | wc -l) chunks of at most ${CHUNK_MB} MiB; carry one per device call:"
  "$0" calls
  ;;
calls)
  for c in "$DIR"/chunks/*; do echo "[\"$c\", \"$DIR/manifest\"]"; done
  ;;
install)
  [ -f "$DIR/manifest" ] || { echo "no $DIR/manifest: carry it with a chunk" >&2; exit 2; }
  missing=$(awk '$1 == "chunk" {print $2, $4}' "$DIR/manifest" | while read -r name sum; do
    [ -f "$DIR/chunks/$name" ] && [ "$(sha256sum "$DIR/chunks/$name" | cut -c1-64)" = "$sum" ] || echo "$name"; done)
  [ -z "$missing" ] || { echo "chunks missing or torn: $missing" >&2; exit 2; }
  mkdir -p "$DIR/wheels"
  cat "$DIR"/chunks/* > "$DIR/all.bin"
  offset=0
  while read -r kind name size sum; do
    [ "$kind" = wheel ] || continue
    dd if="$DIR/all.bin" of="$DIR/wheels/$name" bs=4M iflag=skip_bytes,count_bytes skip="$offset" count="$size" \
      status=none
    [ "$(sha256sum "$DIR/wheels/$name" | cut -c1-64)" = "$sum" ] || { echo "bad checksum: $name" >&2; exit 2; }
    offset=$((offset + size))
  done < "$DIR/manifest"
  rm "$DIR/all.bin"
  python3 -m pip install --no-deps --no-index "$DIR"/wheels/*.whl
  python3 -c "import nvidia.dali as d; print('nvidia-dali', d.__version__)"
  ;;
*)
  sed -n '2,12p' "$0"; exit 2 ;;
esac
