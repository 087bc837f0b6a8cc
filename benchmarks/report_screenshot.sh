#!/usr/bin/env bash
# Render the HTML report of a preset plan (qwen3-235b-a22b on 256 H800) and screenshot it in
# headless Chromium: the picture the README shows.
#
#   bash benchmarks/report_screenshot.sh [out.png] [height_px]
#
# Needs xplan installed and a Chromium (`apt-get install -y chromium`, or chromium-browser /
# google-chrome on PATH). Also prints how long the report took. Writes docs/report.png by default.
set -euo pipefail

out=${1:-docs/report.png}
height=${2:-2300}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no Chromium found: apt-get install -y chromium (or put chromium / google-chrome on PATH)" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

xplan search qwen3-235b-a22b h800 --devices 256 --global-batch 2048 -o "$work/plan.yaml" --json >/dev/null
start=$(date +%s%N)
xplan report "$work/plan.yaml" --html "$work/report.html" --json >"$work/report.json"
end=$(date +%s%N)
echo "report built in $(( (end - start) / 1000000 )) ms ($(wc -c <"$work/report.html") bytes)"
if grep -Eq 'https?://' "$work/report.html"; then
  echo "the report references the network" >&2
  exit 1
fi
# --no-sandbox: Chromium refuses to run as root otherwise (containers); nothing is fetched.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
  --window-size="1100,$height" --screenshot="$work/shot.png" "file://$work/report.html" 2>/dev/null
mkdir -p "$(dirname "$out")"
cp "$work/shot.png" "$out"
echo "screenshot written to $out"
