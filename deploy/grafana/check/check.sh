#!/usr/bin/env bash
# Type-checks a dashboard JSON file (default: deploy/grafana/canvas-gateway.json) against Grafana's
# published dashboard model, @grafana/schema pinned in package-lock.json (`npm ci` here first; `make
# grafana-check` does both). The JSON becomes the initializer of a constant typed by that model, so tsc
# refuses unknown keys, wrong types and values outside the model's enums; an error's line is the
# JSON file's line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dashboard=$(realpath "${1:-$here/../canvas-gateway.json}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '{"extends": "%s/tsconfig.json", "files": ["dashboard.ts"]}\n' "$here" >"$work/tsconfig.json"
{
    printf 'import type { DashboardJson } from "%s/model"; export const dashboard: DashboardJson = ' "$here"
    cat "$dashboard"
    printf ';\n'
} >"$work/dashboard.ts"
"$here/node_modules/.bin/tsc" -p "$work/tsconfig.json" --pretty false | sed "s|^[^(]*dashboard\.ts(|$dashboard(|" || {
    echo "$dashboard does not fit Grafana's dashboard model (line numbers are the file's)" >&2
    exit 1
}
