# deforest-train in a container, for GPUs (and CPUs):
#   docker build -t deforest .
#   docker run --gpus all -v /path/to/tiles:/data -v "$PWD/logs:/logs" --user "$(id -u)" deforest trainer=gpu data.root=/data
# BASE: any Debian-like image with python3.11 and its venv module. python:3.11-slim suffices for
# GPUs too: the PyPI torch wheel carries CUDA, cuDNN and NCCL (nvidia-* wheels); only the driver
# comes from the host, mounted by `--gpus all`. scripts/container-smoke.sh builds on a locally made
# Debian bookworm base instead, where no registry can be reached.
ARG BASE=python:3.11-slim

FROM ${BASE} AS wheel
# optional: a CA bundle path for pip behind a TLS-inspecting proxy (mounted at build time)
ARG PIP_CERT
WORKDIR /src
RUN python3 -m venv /opt/build && /opt/build/bin/pip install --no-cache-dir "build==1.2.2.post1"
COPY pyproject.toml README.md ./
COPY conf ./conf
COPY deforest ./deforest
RUN /opt/build/bin/python -m build --wheel --outdir /wheels .

FROM ${BASE}
ARG PIP_CERT
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
    && pip install --no-cache-dir --constraint /tmp/constraints.txt /tmp/wheels/deforest-*.whl \
    && rm -rf /tmp/wheels /tmp/constraints.txt \
    && useradd --create-home --uid 1000 deforest \
    && mkdir -p /data /logs \
    && chown deforest:deforest /logs
USER 1000:1000
WORKDIR /home/deforest
ENTRYPOINT ["deforest-train"]
