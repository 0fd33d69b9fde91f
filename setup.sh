#!/usr/bin/env bash
# Create .venv (Python 3.11) and install recorun into it with every extra (server, jets, farm,
# metrics, bench, test): what the workflows, the benchmarks and the tests need.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
# nginx for the gRPC load balancer (recorun-balancer, tests/test_balancing.py): installed with
# apt-get when it is missing and apt-get can be used, else a note saying how
bash deploy/nginx/install-nginx.sh || true
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.recorun-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade "pip>=23" "setuptools>=68" wheel
    # torch is pinned to the CPU build; installing it first keeps pip from choosing another.
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet --no-build-isolation -e ".[all]"
    touch "$stamp"
fi
