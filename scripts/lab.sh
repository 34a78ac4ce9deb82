#!/usr/bin/env bash
# Start JupyterLab on chapters/ (what `make lab` runs), as a user or as root.
#
# As root (NGC containers, many clusters) JupyterLab refuses to start without --allow-root; this
# script adds it when uid is 0. Settings, from the environment:
#   LAB_IP    address to listen on (default 127.0.0.1: only this machine; 0.0.0.0 to reach a
#             cluster node or a container from outside, with its token)
#   LAB_PORT  port (default 8888; if it is taken JupyterLab tries the next ones)
#   LAB_OPEN  1: open a browser, 0: print the URL only (default: 1 when a display exists)
# Extra arguments go to `jupyter lab` unchanged, e.g. scripts/lab.sh --ServerApp.port_retries=0
set -euo pipefail
cd "$(dirname "$0")/.."
JUPYTER="${JUPYTER:-.venv/bin/jupyter}"
args=(lab chapters --ip="${LAB_IP:-127.0.0.1}" --port="${LAB_PORT:-8888}")
if [ "$(id -u)" -eq 0 ]; then
    args+=(--allow-root)
fi
open_default=0
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] || [ "$(uname)" = Darwin ]; then
    open_default=1
fi
if [ "${LAB_OPEN:-$open_default}" != 1 ]; then
    args+=(--no-browser)
fi
exec "$JUPYTER" "${args[@]}" "$@"
