# Shared by scripts/serve and scripts/test: make .venv, install the project when its
# dependencies changed (a stamp of pyproject.toml's hash), and reuse it otherwise.
set -euo pipefail

aether_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

ensure_venv() {
    local extras="$1"
    cd "$aether_root"
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "aether needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
            exit 1
        fi
        echo "creating .venv with $("$python" --version)" >&2
        "$python" -m venv .venv
    fi
    local spec="."
    [ -n "$extras" ] && spec=".[$extras]"
    local stamp=".venv/.aether-installed-$(sha256sum pyproject.toml | cut -c1-16)-${extras:-base}"
    if [ ! -f "$stamp" ]; then
        echo "installing aether${extras:+[$extras]} into .venv" >&2
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -e "$spec"
        touch "$stamp"
    fi
}
