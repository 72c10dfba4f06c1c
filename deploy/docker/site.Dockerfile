# syntax=docker/dockerfile:1
# fedbridge site-agent image (docs/operate/deploy.md). Build from the repository root:
#   docker build -f deploy/docker/site.Dockerfile -t fedbridge/site:0.1.0 .
# A CUDA site passes --build-arg TORCH_INDEX_URL=<the PyTorch index of its CUDA version>. torch 2.13.0 is installed
# FIRST, then the package with its `site` extra (TRL, accelerate, datasets, Opacus...).
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
# DeepSpeed must not try to compile its CUDA ops at install time. DL3013: the extra's versions are pinned in
# pyproject.toml, not here.
# hadolint ignore=DL3013
RUN DS_BUILD_OPS=0 pip install ".[site]" && pip check && python -m compileall -q /opt/fedbridge/venv

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 fedbridge \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fedbridge --shell /usr/sbin/nologin fedbridge \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/fedbridge \
 && install -d -m 0755 /etc/fedbridge /srv/fedbridge
COPY --from=build /opt/fedbridge/venv /opt/fedbridge/venv
# DL3064 is a false positive: it reads the TOKEN in TOKENIZERS_PARALLELISM as a secret; no secret is baked in.
# hadolint ignore=DL3064
ENV PATH=/opt/fedbridge/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/var/lib/fedbridge \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
USER 10001:10001
WORKDIR /var/lib/fedbridge
VOLUME ["/var/lib/fedbridge"]
# Exit 0: the federation is done; 2: refused (config, data, policy, audit log); anything else: restartable.
ENTRYPOINT ["fedbridge-site", "run"]
CMD ["--config", "/etc/fedbridge/site.toml"]
