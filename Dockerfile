# syntax=docker/dockerfile:1
# The operator's container image: `deployment-cleanup operator -A` as user 10001.
#
#   docker build -t deployment-cleanup:0.1.0 .
#
# Two stages: the builder makes a venv with the exact pins of requirements/operator.txt (wheels
# only, so no compiler is needed) plus this package's own wheel; the final stage copies only that
# venv onto the same base image, without pip, setuptools or any build tool.
# The base image is pinned by its full version tag; pin it by digest too (python:3.11.14-slim-
# bookworm@sha256:...) where your registry policy asks for it. Both stages must use the same
# image, because the venv refers to its Python by path.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the pins change.
COPY requirements/operator.txt requirements/operator.txt
RUN python -m venv /opt/deployment-cleanup \
 && /opt/deployment-cleanup/bin/pip install --only-binary=:all: --requirement requirements/operator.txt
COPY pyproject.toml README.md ./
COPY operator/deployment_cleanup/ operator/deployment_cleanup/
# --no-deps: the package gets exactly the pinned dependencies above, and pip check proves they fit.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/deployment-cleanup/bin/pip install --no-deps /wheels/*.whl \
 && /opt/deployment-cleanup/bin/pip check \
 && /opt/deployment-cleanup/bin/python -m compileall -q /opt/deployment-cleanup/lib \
 && /opt/deployment-cleanup/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="deployment-cleanup" \
      org.opencontainers.image.description="Archives inactive deployments; refuses whenever it cannot prove one is inactive." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
# The root filesystem is read-only in the Pod: no bytecode writes at run time (compiled above).
ENV PATH=/opt/deployment-cleanup/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# No installer at run time, and a fixed non-root user matching the chart's runAsUser.
RUN python -m pip uninstall --yes --disable-pip-version-check pip setuptools wheel \
 && groupadd --system --gid 10001 deployment-cleanup \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin deployment-cleanup
COPY --from=builder /opt/deployment-cleanup /opt/deployment-cleanup
USER 10001:10001
# 8080: Prometheus metrics; 8081: kopf's health endpoint (/healthz).
EXPOSE 8080 8081
ENTRYPOINT ["deployment-cleanup"]
CMD ["operator", "-A"]
