# syntax=docker/dockerfile:1.7
# canaryd container image.
#   docker build -t canaryd:0.1.0 --build-arg REVISION=$(git rev-parse HEAD) \
#     --build-arg CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ) .
# Stage 1 builds wheels for canaryd and every dependency; stage 2 installs them from that
# directory only (--no-index: no network, no compiler) and runs as the numeric user 65532.
# Pin the base by digest too when publishing: python:3.11.14-slim-bookworm@sha256:<digest>.
# Any base with Python 3.11+ whose `python` and `pip` come first on PATH works: `make image`
# (hack/build-image.sh) makes one from Debian's packages where this registry is out of reach.
ARG PYTHON_IMAGE=docker.io/library/python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Metadata first, then the package: pyproject names README.md as the readme.
COPY pyproject.toml README.md ./
COPY canaryd ./canaryd
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# Re-declared (no default: the global one above applies) so the label below names the base used.
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="canaryd" \
      org.opencontainers.image.description="Progressive-delivery canary controller for Gateway API (GAMMA) HTTPRoutes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/canaryd/canaryd" \
      org.opencontainers.image.url="https://github.com/canaryd/canaryd" \
      org.opencontainers.image.documentation="https://github.com/canaryd/canaryd/tree/main/charts/canaryd" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/nonroot
# Install only from the wheels of stage 1 (bind-mounted, so they leave no layer behind),
# then drop pip/setuptools/wheel: nothing in the final image can build or fetch packages.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels canaryd \
    && python -m pip uninstall -y pip setuptools wheel \
    && groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --home-dir /home/nonroot --create-home \
       --shell /usr/sbin/nologin nonroot \
    && canaryd --help >/dev/null
USER 65532:65532
WORKDIR /home/nonroot
EXPOSE 8080
ENTRYPOINT ["canaryd"]
CMD ["run"]
