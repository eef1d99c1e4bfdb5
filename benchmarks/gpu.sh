#!/usr/bin/env bash
# The prepared GPU benchmark in one command (issue 11, item 5): environment, data, then
# benchmarks/gpu.py (under 8 minutes on an H200; its options follow the data source).
#
#   benchmarks/gpu.sh [DATA_SOURCE] [gpu.py options ...]
#
# DATA_SOURCE (else $FEDCL_DD_IMPORT, else shared/data or ../shared/data where present) is a
# folder laid out like the project's shared/data; `fedcl-dd data import` copies it into the
# data root ($FEDCL_DD_DATA, else ~/.cache/fedcl-dd). Without one, the data root is used as is.
#
# Python: .venv when present. Otherwise one is made:
#   * with $FEDCL_DD_WHEELS (a folder of wheels, for machines without a package index): on top
#     of the machine's own torch (--system-site-packages), the project installed offline from
#     those wheels (opacus at least; flwr and flwr-datasets for the FedDM round, which gpu.py
#     skips with the reason when they are missing);
#   * else `make setup`, which needs a package index.
set -euo pipefail
cd "$(dirname "$0")/.."

source_dir="${FEDCL_DD_IMPORT:-}"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    source_dir="$1"
    shift
fi
if [ -z "$source_dir" ]; then
    for candidate in shared/data ../shared/data; do
        if [ -d "$candidate" ]; then
            source_dir="$candidate"
            break
        fi
    done
fi

if [ ! -x .venv/bin/python ]; then
    if [ -n "${FEDCL_DD_WHEELS:-}" ]; then
        python3 -m venv --system-site-packages .venv
        offline=(.venv/bin/python -m pip install --no-index --find-links "$FEDCL_DD_WHEELS")
        # No build isolation: setuptools comes from the machine, not from an index.
        "${offline[@]}" --no-build-isolation -e .
        "${offline[@]}" flwr flwr-datasets ||
            echo "gpu.sh: flwr/flwr-datasets not installable from $FEDCL_DD_WHEELS; the FedDM round will be skipped" >&2
    else
        make setup
    fi
fi

if [ -n "$source_dir" ]; then
    .venv/bin/fedcl-dd data import "$source_dir"
else
    echo "gpu.sh: no data source given or found; using the data root as it is" >&2
fi

PYTHONUNBUFFERED=1 exec .venv/bin/python benchmarks/gpu.py "$@"
