#!/usr/bin/env bash
# Put `hashflex` on PATH: a symlink <bin>/hashflex -> this clone's .venv/bin/hashflex (scripts/setup.sh runs it).
# /usr/local/bin is on every login's PATH and on sudo's secure_path, so `hashflex status` and `sudo hashflex
# install-service` work in any new shell (an activated venv lasts one shell and does not pass through sudo).
# A hashflex there that is not a symlink (a packaged install), or a link to another clone's live CLI, is left alone. HASHFLEX_BIN_DIR picks another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
target="$PWD/.venv/bin/hashflex"
bin_dir=${HASHFLEX_BIN_DIR:-/usr/local/bin}
link="$bin_dir/hashflex"
if [ ! -x "$target" ]; then
  echo "setup: $target is missing: run scripts/setup.sh" >&2
  exit 1
fi
if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then
  exit 0
fi
if [ -e "$link" ] && [ ! -L "$link" ]; then
  echo "setup: $link exists and is not a link, left alone; this clone's CLI is $target" >&2
  exit 0
fi
if [ -L "$link" ] && [ -e "$link" ]; then
  # another clone's live CLI (a test clone, CI) is not taken over; a dangling link (its clone gone) is replaced
  echo "setup: $link points at $(readlink "$link"), left alone; this clone's CLI is $target" >&2
  exit 0
fi
SUDO=""
if [ ! -w "$bin_dir" ]; then
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "setup: cannot write $bin_dir, so hashflex is not on PATH: run \`source .venv/bin/activate\` in each" \
      "shell, or \`sudo ln -sfn $target $link\` once" >&2
    exit 0
  fi
fi
$SUDO ln -sfn "$target" "$link"
echo "setup: linked $link -> $target (hashflex is on PATH)" >&2
