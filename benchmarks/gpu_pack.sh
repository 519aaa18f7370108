#!/usr/bin/env bash
# Builds `.gpu/site312.tar.xz`, the archive `benchmarks/gpu.sh` unpacks on a lent GPU machine:
# TerraTorch 1.2.10 and the packages it imports that the machine's image (Python 3.12, torch
# 2.11.0+cu130, numpy, timm, lightning, ...) lacks, installed for Python 3.12 and compressed to
# fit the 64 MiB a call may carry (wheels: 77 MB; this archive: 48 MiB). Run here, in the repo
# root, with network access to PyPI; `.gpu/` must be ignored (e.g. in .git/info/exclude).
set -euo pipefail
python=${PYTHON:-.venv/bin/python}
wheels=$(mktemp -d) site=$(mktemp -d)
trap 'rm -rf "$wheels" "$site"' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform any)
# Versions as in .venv (requirements/py311-cpu.txt); --no-deps, so this list is the whole set.
packages=(terratorch==1.2.10 aenum==3.1.17 affine==3.0.1 albucore==0.0.24 albumentations==2.0.8
    annotated-types==0.8.0 click-plugins==1.1.1.2 cligj==0.7.2 diffusers==0.42.1 docstring_parser==0.18.0
    geopandas==1.2.0 jsonargparse==4.53.0 kornia==0.9.0 kornia_rs==0.2.0 lightly==1.5.22 lightly-utils==0.0.2
    pycocotools==2.0.11 pydantic==2.14.4 pydantic_core==2.50.5 pyproj==3.7.2 python-box==8.0.0 rasterio==1.4.4
    rioxarray==0.19.0 segmentation_models_pytorch==0.6.0 shapely==2.2.0 simsimd==6.5.16 stringzilla==5.3.2
    termcolor==3.3.0 torchgeo==0.8.1 typeshed_client==2.15.0 typing-inspection==0.4.5)
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$wheels" "${packages[@]}"
"$python" -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --target "$site" "$wheels"/*.whl
mkdir -p .gpu
tar -C "$site" -cf - . | xz -9e -T0 > .gpu/site312.tar.xz
ls -l .gpu/site312.tar.xz
