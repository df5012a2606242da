# The e2e suite's second image: what the test apps and upstreams run beside the product, the
# official openai and anthropic SDKs and llama.cpp (xllamacpp, with gguf for its tiny model), and
# spendwarden itself (no dependencies) for its devtools: the llama.cpp server and the tiny model.
# The heavy install comes before any COPY, so buildah's layer cache keeps it across code changes.
# Built by: scripts/build-image.sh spendwarden-testbed:dev tests/integration/e2e/testbed.Dockerfile
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/testbed/bin:$PATH
# llama.cpp's wheel links the OpenMP runtime, which the slim base lacks.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/testbed \
 && /opt/testbed/bin/pip install "openai>=1.40,<4" "anthropic>=0.40,<3" "xllamacpp>=2025.1" "gguf>=0.10,<1" \
      "numpy" "pyyaml>=6,<7"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN /opt/testbed/bin/pip install --no-deps . && rm -rf /src
USER 10001:10001
WORKDIR /tmp
