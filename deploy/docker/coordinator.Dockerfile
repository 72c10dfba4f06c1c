# syntax=docker/dockerfile:1
# fedbridge coordinator image (docs/operate/deploy.md). Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t fedbridge/coordinator:0.1.0 .
# torch 2.13.0 (CPU wheel, from the PyTorch CPU index) is installed FIRST, then the package: a bare `torch`
# requirement with no torch installed would pull a multi-GB CUDA build.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fedbridge/venv
ENV PATH=/opt/fedbridge/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY fedcommon ./fedcommon
COPY strategies ./strategies
COPY coordinator ./coordinator
COPY site_agent ./site_agent
COPY sandbox ./sandbox
RUN pip install . && pip check && python -m compileall -q /opt/fedbridge/venv

FROM ${PYTHON_IMAGE}
# A fixed, unprivileged uid/gid: bind-mounted key files must be readable by it (chown 10001 or run with --user).
RUN groupadd --system --gid 10001 fedbridge \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fedbridge --shell /usr/sbin/nologin fedbridge \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/fedbridge \
 && install -d -m 0755 /etc/fedbridge /srv/fedbridge
COPY --from=build /opt/fedbridge/venv /opt/fedbridge/venv
# Read-only root filesystem: no bytecode written at run time (compiled above), HOME on the state volume, offline hubs.
# DL3064 is a false positive: it reads the TOKEN in TOKENIZERS_PARALLELISM as a secret; no secret is baked in.
# hadolint ignore=DL3064
ENV PATH=/opt/fedbridge/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/var/lib/fedbridge \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
USER 10001:10001
WORKDIR /var/lib/fedbridge
VOLUME ["/var/lib/fedbridge"]
EXPOSE 50051 8080
# Exit 0: stopped or done; 1: engine failure (a restart resumes); 2: config/base-model/dashboard error.
ENTRYPOINT ["fedbridge-admin", "serve"]
CMD ["--config", "/etc/fedbridge/federation.toml"]
