#!/usr/bin/env bash
# Installs everything a fresh Debian 12 machine (with rustup and python3) lacks to build, run and test cubeload:
#   - GDAL (libgdal-dev, gdal-bin for gdalwarp in the tests, netcdf-bin) and the font of the PNGs
#     (fonts-dejavu-core) from apt;
#   - a CPU libtorch 2.13 for `tch`, assembled from PyPI wheels into third_party/libtorch (git-ignored);
#   - a Python virtual environment .venv with the packages the tests use: numpy, zarr, xarray, pytest and
#     netCDF4 (the xarray suite in tests/python), scipy (xarray's interpolation), torch (the binding's suite in python/tests), moto's S3
#     server (the object-store tests). The cubeload
#     Python package itself is built into it by scripts/test.sh (`pip install ./python`).
# Idempotent: every step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# --- GDAL --------------------------------------------------------------------------------------------------
need_apt=()
for pkg in libgdal-dev gdal-bin netcdf-bin fonts-dejavu-core; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  log "installing ${need_apt[*]} from apt"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# --- libtorch (CPU) for tch --------------------------------------------------------------------------------
TORCH_VERSION=2.13.0
LT="$ROOT/third_party/libtorch"
if [ "$(cat "$LT/build-version" 2>/dev/null)" != "$TORCH_VERSION" ]; then
  log "assembling a CPU libtorch $TORCH_VERSION from PyPI wheels into third_party/libtorch"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" \
    "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
  rm -rf "$LT" && mkdir -p "$LT/lib" "$LT/include"
  python3 - "$tmp" "$LT" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
libs = {"torch/lib/libtorch_cpu.so", "torch/lib/libtorch.so", "torch/lib/libc10.so", "torch/lib/libgomp.so.1"}
for wheel in glob.glob(os.path.join(tmp, "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("torch/include/"):
                target = os.path.join(dest, "include", name[len("torch/include/"):])
            elif name in libs or name.endswith(("/libcudart.so.13", "/libcupti.so.13")):
                target = os.path.join(dest, "lib", os.path.basename(name))
            else:
                continue
            if name.endswith("/"):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
PY
  echo "$TORCH_VERSION" > "$LT/build-version"
fi

# --- Python packages used by the tests ---------------------------------------------------------------------
VENV="$ROOT/.venv"
# Whether the venv imports these modules. Run from / because the repository root holds a `torch/` directory
# (the cubeload-torch crate), which Python would import from the working directory as an empty namespace
# package, so that `import torch` would succeed without torch installed.
venv_has() { (cd / && "$VENV/bin/python" -c "import $1") >/dev/null 2>&1; }
if [ ! -x "$VENV/bin/python" ]; then
  log "creating .venv"
  python3 -m venv "$VENV"
fi
if ! venv_has "numpy, zarr, xarray"; then
  log "installing numpy, zarr, xarray into .venv"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q numpy "zarr>=3" xarray
fi
if ! venv_has "pytest, netCDF4, scipy"; then
  # scipy: xarray's `interp`, the tests' independent bilinear reference.
  log "installing pytest, netCDF4, scipy into .venv"
  "$VENV/bin/python" -m pip install -q pytest netCDF4 scipy
fi
if ! venv_has "moto.server"; then
  # A real S3-compatible server for the object-store tests, run on loopback.
  log "installing moto[server] into .venv"
  "$VENV/bin/python" -m pip install -q "moto[server]"
fi
if ! venv_has "torch"; then
  # PyPI's Linux torch is the CUDA build (2.7 GB with its dependencies); the Python tests need real torch.
  log "installing torch 2.13 into .venv (large download)"
  "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
log "ready"
