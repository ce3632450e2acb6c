# Sourced by scripts/serve and scripts/test: make .venv and install tampu into it, only when
# something that matters changed (pyproject.toml, the list of modules, the extras asked for);
# pip's output goes to .venv/install.log, not to the terminal.
set -euo pipefail
extras="$1"
stamp_file=".venv/.tampu-installed"
stamp="$(cat pyproject.toml; echo "$extras"; find core plugins -name '*.py' | sort)"
stamp="$(printf '%s' "$stamp" | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
    echo "installing tampu into .venv (first run, or pyproject.toml or the modules changed)..." >&2
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if ! { .venv/bin/python -m pip install -q --upgrade pip &&
           .venv/bin/python -m pip install -q -e ".[$extras]" \
               --config-settings editable_mode=strict; } >.venv/install.log 2>&1; then
        cat .venv/install.log >&2
        echo "tampu: installing into .venv failed (log above, also in .venv/install.log)" >&2
        exit 1
    fi
    echo "$stamp" >"$stamp_file"
fi
