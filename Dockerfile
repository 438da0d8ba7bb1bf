# deforest-train in a container, for GPUs (and CPUs):
#   docker build -t deforest .
#   docker run --gpus all -v /path/to/tiles:/data -v "$PWD/logs:/logs" --user "$(id -u)" deforest trainer=gpu data.root=/data
# BASE: any Debian-like image with python3.11 and its venv module. python:3.11-slim suffices for
# GPUs too: the PyPI torch wheel carries CUDA, cuDNN and NCCL (nvidia-* wheels); only the driver
# comes from the host, mounted by `--gpus all`. scripts/container-smoke.sh builds on a locally made
# Debian bookworm base instead, where no registry can be reached.
# TORCH_INDEX: where torch comes from. Empty (the default): PyPI's torch, whose CUDA libraries
# (about 2.7 GB of wheels) make the one image that trains on GPUs and CPUs: GPU users keep the
# default. A CUDA base (nvidia/cuda:*-runtime-*) adds nothing to it and ships no python3.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU-only torch (under 200 MB) from
# that index instead, for a small image that never sees a GPU:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t deforest:cpu .
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS: local package sources for pip during the build only (the
# smoke script passes the host's with their folders mounted); the image keeps neither.
ARG BASE=python:3.11-slim

FROM ${BASE} AS wheel
# optional: a CA bundle path for pip behind a TLS-inspecting proxy (mounted at build time)
ARG PIP_CERT
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
WORKDIR /src
RUN python3 -m venv /opt/build && /opt/build/bin/pip install --no-cache-dir "build==1.2.2.post1"
COPY pyproject.toml README.md ./
COPY conf ./conf
COPY deforest ./deforest
RUN /opt/build/bin/python -m build --wheel --outdir /wheels .

FROM ${BASE}
ARG PIP_CERT
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG TORCH_INDEX=""
ENV VIRTUAL_ENV=/opt/deforest \
    PATH=/opt/deforest/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    DEFOREST_DATA_DIR=/data \
    DEFOREST_LOG_DIR=/logs \
    DEFOREST_CACHE_DIR=/tmp/deforest-cache
COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /wheels /tmp/wheels
RUN python3 -m venv /opt/deforest \
    && pip install --no-cache-dir ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
        --constraint /tmp/constraints.txt /tmp/wheels/deforest-*.whl \
    && rm -rf /tmp/wheels /tmp/constraints.txt \
    && useradd --create-home --uid 1000 deforest \
    && mkdir -p /data /logs \
    && chown deforest:deforest /logs
USER 1000:1000
WORKDIR /home/deforest
ENTRYPOINT ["deforest-train"]
