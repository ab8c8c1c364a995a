#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ headers into DEST without installing anything, and print the include dir.
#
# The headers are third-party (MIT) and are never committed. On Debian, the libonnxruntime-dev package
# of a newer release (it can't be installed on bookworm, whose libc is older) is downloaded with a
# private apt configuration and unpacked with dpkg-deb. Elsewhere, set ORT_INCLUDE_DIR to the include/
# folder of an ONNX Runtime release archive instead (see custom_ops/README.md).
set -euo pipefail

dest=${1:?usage: fetch_ort_headers.sh DEST [SUITE]}
suite=${2:-${YATDEPLOY_ORT_DEB_SUITE:-trixie}}
mirror=${YATDEPLOY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
include="$dest/root/usr/include/onnxruntime"

if [ -f "$include/onnxruntime_lite_custom_op.h" ]; then
    echo "$include"
    exit 0
fi
for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || {
        echo "fetch_ort_headers: $tool not found; set ORT_INCLUDE_DIR to an ONNX Runtime release's include/ folder" >&2
        exit 1
    }
done

apt_dir="$dest/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$dest/root"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb [signed-by=$keyring] $mirror $suite main" >"$apt_dir/sources.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=/nonexistent"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "Dir::State::status=/dev/null"
    -o "APT::Sandbox::User=$(id -un)"
    -o "Debug::NoLocking=1"
    -o "Acquire::Retries=3"
)
echo "fetch_ort_headers: downloading libonnxruntime-dev from Debian $suite" >&2
apt-get -q "${apt_opts[@]}" update >&2
(cd "$dest" && apt-get -q "${apt_opts[@]}" download libonnxruntime-dev >&2)
deb=$(ls "$dest"/libonnxruntime-dev_*.deb | head -n 1)
dpkg-deb -x "$deb" "$dest/root"
if [ ! -f "$include/onnxruntime_lite_custom_op.h" ]; then
    echo "fetch_ort_headers: $deb has no onnxruntime_lite_custom_op.h" >&2
    exit 1
fi
echo "$include"
