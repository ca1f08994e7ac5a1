#!/usr/bin/env bash
# Build the web terminal into relayd/web/assets/ (package data; git-ignored).
# npm ci installs the pinned @xterm packages from package-lock.json (from npm's
# cache when it has them); the page and the vendors' built files are copied as
# they are: no bundler, no CDN at run time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/../relayd/web/assets"
cd "$here"
if ! command -v npm >/dev/null; then
  echo "web/build.sh: npm is missing (install Node.js 18+ and npm)" >&2
  exit 1
fi
lock_sum="$(cksum < package-lock.json | cut -d' ' -f1)"
if [ ! -f "node_modules/.relayd-lock-$lock_sum" ]; then
  npm ci --prefer-offline --no-audit --no-fund --loglevel=error
  touch "node_modules/.relayd-lock-$lock_sum"
fi
mkdir -p "$here/../relayd/web"
tmp="$(mktemp -d "$here/../relayd/web/.assets.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cp src/index.html src/app.css src/*.js "$tmp/"
cp node_modules/@xterm/xterm/lib/xterm.mjs node_modules/@xterm/xterm/css/xterm.css "$tmp/"
cp node_modules/@xterm/addon-fit/lib/addon-fit.mjs "$tmp/"
cp node_modules/@xterm/xterm/LICENSE "$tmp/xterm-LICENSE.txt"
cp node_modules/@xterm/addon-fit/LICENSE "$tmp/addon-fit-LICENSE.txt"
# The source map comments name files relayd does not serve.
sed -i '/^\/\/# sourceMappingURL=/d' "$tmp/xterm.mjs" "$tmp/addon-fit.mjs"
chmod 644 "$tmp"/*
chmod 755 "$tmp"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "web assets: $(ls "$out" | wc -l) files in relayd/web/assets"
