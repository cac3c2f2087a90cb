# Sourced by scripts/test and scripts/examples: finds ComfyUI, makes sure a Python environment
# with ComfyUI's and the pack's requirements exists, and exports PY and COMFYUI_PATH.
# Idempotent and quick when nothing changed (a stamp records what was installed).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

find_comfyui() {
  local c
  for c in "${COMFYUI_PATH:-}" "$(dirname "$REPO")/.." "$HOME/comfy/ComfyUI"; do
    if [ -n "$c" ] && [ -f "$c/main.py" ] && [ -d "$c/comfy" ]; then
      if [ "$c" != "${COMFYUI_PATH:-}" ] && [ "$c" = "$(dirname "$REPO")/.." ] && [ "$(basename "$(dirname "$REPO")")" != "custom_nodes" ]; then
        continue
      fi
      (cd "$c" && pwd); return 0
    fi
  done
  return 1
}

if ! COMFYUI_PATH="$(find_comfyui)"; then
  echo "ComfyUI not found. Check out ComfyUI (v0.3.64 or newer) to ~/comfy/ComfyUI, put this pack in" >&2
  echo "ComfyUI/custom_nodes/, or set COMFYUI_PATH." >&2
  exit 1
fi
export COMFYUI_PATH

# The Python to use: SUPERCOND_PYTHON if given (e.g. the one your ComfyUI already runs with),
# else a venv beside the ComfyUI checkout, created on first use.
if [ -n "${SUPERCOND_PYTHON:-}" ]; then
  PY="$SUPERCOND_PYTHON"
else
  VENV="${SUPERCOND_VENV:-$(dirname "$COMFYUI_PATH")/venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV" >&2
    python3 -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
fi
export PY

stamp_file="$("$PY" -c 'import sys; print(sys.prefix)')/.supercond-setup"
want="$(cat "$COMFYUI_PATH/requirements.txt" "$REPO/requirements.txt" "$REPO/requirements-dev.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp_file" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing ComfyUI's and Supercond's requirements into $("$PY" -c 'import sys; print(sys.prefix)')" >&2
  "$PY" -m pip install -q --upgrade pip
  # requests: ComfyUI 0.3.64 imports it but its requirements.txt omits it.
  "$PY" -m pip install -q -r "$COMFYUI_PATH/requirements.txt" requests -r "$REPO/requirements-dev.txt"
  echo "$want" > "$stamp_file"
fi
