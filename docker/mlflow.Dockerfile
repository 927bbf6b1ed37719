# syntax=docker/dockerfile:1
# The MLflow tracking server with the model registry and the basic-auth app, for the Helm chart.
# Small on purpose (no CUDA, no torch): it only serves the tracking API, the registry and proxied artifacts.
# Build with docker/ as the context:
#   docker build -f docker/mlflow.Dockerfile -t mole-mlflow:3.17.2 docker      (or `make images`)
# Python 3.11 as the mole image, Debian 12 slim.
FROM python:3.11.14-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
ARG CREATED=unknown

LABEL org.opencontainers.image.title="mole-mlflow" \
      org.opencontainers.image.description="MLflow tracking server with model registry and basic auth, PostgreSQL and S3 clients" \
      org.opencontainers.image.version="${MLFLOW_VERSION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="mole" \
      org.opencontainers.image.base.name="python:3.11.14-slim-bookworm"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY mlflow-requirements.txt /tmp/mlflow-requirements.txt
RUN pip install -r /tmp/mlflow-requirements.txt \
    && rm /tmp/mlflow-requirements.txt \
    && mlflow --version

RUN groupadd --gid 10001 mlflow \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow
ENV HOME=/home/mlflow
USER 10001:10001
WORKDIR /home/mlflow

EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]
