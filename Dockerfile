# syntax=docker/dockerfile:1
#
# offramp images, built from the repository root:
#   docker build -t offramp:gpu .                 # default target: gpu
#   docker build -t offramp:cpu --target cpu .
#
# Targets:
#   demo  builder: installs the `export` extra (torch), trains and exports the digits demo bundle.
#         Nothing else of it reaches the runtime images.
#   cpu   python:3.11-slim + onnxruntime (CPU build).
#   gpu   NVIDIA CUDA 13 runtime + cuDNN 9 on Ubuntu 24.04 (Python 3.12) + onnxruntime-gpu.
# Neither runtime image contains torch, and each holds exactly one onnxruntime distribution,
# checked at build time by docker/check_runtime.py.
#
# Versions (change them together; docs/deploy.md lists them):
#   onnxruntime-gpu 1.31.1 (docker/runtime-constraints.txt) is built for CUDA 13.x and cuDNN 9.x
#   (its CUDA provider links libcudart.so.13 / libcublas.so.13 and loads libcudnn.so.9; its own
#   `cuda` extra asks for nvidia-cuda-runtime~=13.0). Base: CUDA 13.0.2 with cuDNN 9 on Ubuntu
#   24.04. CUDA 13.0 rather than a later 13.x because the image's NVIDIA_REQUIRE_CUDA=cuda>=13.0
#   is then met by every CUDA 13 driver: the host needs NVIDIA driver 580 or newer and the NVIDIA
#   Container Toolkit.
#
# Bundles: the demo bundle is baked in at /bundles/demo and served by default. Mount others at
# /bundles/<name> and list them in OFFRAMP_BUNDLES (comma-separated).
#
# Base images: any Debian-like image with Python 3 and `python3 -m venv` works as PYTHON_IMAGE (every
# stage installs into a virtual environment at /opt/venv and calls `python3`, so Debian's
# externally managed system Python and a missing `python` command do not matter).
# docker/build-local.sh builds the cpu target with podman on a machine without registry access:
# a debootstrapped Debian bookworm base, torch from a local wheel directory (TORCH_FIND_LINKS).

ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# --------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS demo

# torch is pinned to 2.13.0 by constraints.txt. PyPI's x86_64 torch wheel pulls gigabytes of CUDA
# libraries the demo does not need; the PyTorch CPU index serves 2.13.0+cpu. On another
# architecture or behind a mirror, point TORCH_INDEX_URL at that CPU index (or set it empty to
# use the default index alone: PyPI's aarch64 torch wheels are CPU-only).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A directory (inside the build, e.g. a bind mount) holding the torch 2.13.0+cpu wheel, searched as
# well: `--find-links`. Empty by default. With TORCH_INDEX_URL empty too, pip takes torch from
# there, since 2.13.0+cpu sorts above PyPI's 2.13.0 (docker/build-local.sh does this).
ARG TORCH_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY offramp ./offramp
COPY server ./server
COPY model_export ./model_export
COPY load_tests ./load_tests
# A virtual environment, as in the runtime stages: a Debian base's system Python is externally
# managed (PEP 668) and refuses a plain `pip install`.
RUN python3 -m venv /opt/venv \
 && pip install -c constraints.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
    ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} '.[cpu,export]' \
 && offramp demo --out /bundles/demo \
 && rm -f /bundles/demo/checkpoint.pt

# --------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY offramp ./offramp
COPY server ./server
COPY model_export ./model_export
COPY load_tests ./load_tests
COPY docker/runtime-constraints.txt docker/check_runtime.py ./docker/
COPY --from=demo /bundles/demo /bundles/demo
RUN python3 -m venv /opt/venv \
 && pip install -c docker/runtime-constraints.txt '.[cpu,fast,grpc,redis]' \
 && python docker/check_runtime.py onnxruntime /bundles/demo \
 && groupadd --system --gid 10001 offramp \
 && useradd --system --uid 10001 --gid offramp --home-dir /var/lib/offramp --shell /usr/sbin/nologin offramp \
 && mkdir -p /var/lib/offramp/state /var/cache/offramp \
 && chown -R offramp:offramp /var/lib/offramp /var/cache/offramp \
 && rm -rf /src

WORKDIR /var/lib/offramp
ENV OFFRAMP_HOST=0.0.0.0 \
    OFFRAMP_PORT=8000 \
    OFFRAMP_DEVICE=cpu \
    OFFRAMP_BUNDLES=/bundles/demo \
    OFFRAMP_STATE_DIR=/var/lib/offramp/state \
    OFFRAMP_CACHE_DIR=/var/cache/offramp
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('OFFRAMP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["offramp"]
CMD ["serve"]

# --------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's python3 (3.12): the CUDA base has no Python. Versions come with the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY offramp ./offramp
COPY server ./server
COPY model_export ./model_export
COPY load_tests ./load_tests
COPY docker/runtime-constraints.txt docker/check_runtime.py ./docker/
COPY --from=demo /bundles/demo /bundles/demo
# Only the `gpu` extra: installing `.[cpu]` as well would put both onnxruntime builds in one
# environment, and the build check below fails on that.
RUN python3 -m venv /opt/venv \
 && pip install -c docker/runtime-constraints.txt '.[gpu,fast,grpc,redis]' \
 && python docker/check_runtime.py onnxruntime-gpu /bundles/demo \
 && groupadd --system --gid 10001 offramp \
 && useradd --system --uid 10001 --gid offramp --home-dir /var/lib/offramp --shell /usr/sbin/nologin offramp \
 && mkdir -p /var/lib/offramp/state /var/cache/offramp \
 && chown -R offramp:offramp /var/lib/offramp /var/cache/offramp \
 && rm -rf /src

WORKDIR /var/lib/offramp
ENV OFFRAMP_HOST=0.0.0.0 \
    OFFRAMP_PORT=8000 \
    OFFRAMP_DEVICE=cuda \
    OFFRAMP_BUNDLES=/bundles/demo \
    OFFRAMP_STATE_DIR=/var/lib/offramp/state \
    OFFRAMP_CACHE_DIR=/var/cache/offramp
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('OFFRAMP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["offramp"]
CMD ["serve"]
