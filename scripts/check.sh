#!/usr/bin/env bash
# Style checks: C formatting (clang-format, .clang-format) and Lua lint
# (luacheck, .luacheckrc). Fails on the first file that is off.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t cfiles < <(git ls-files 'src/*.c' 'src/*.h' 'examples/*.c' 'fuzz/*.c' 'spec/c/*.c')
clang-format --dry-run --Werror "${cfiles[@]}"
luacheck --no-color -q .
echo "check: ${#cfiles[@]} C files formatted, Lua lint clean"
