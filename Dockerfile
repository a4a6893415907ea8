# rcnnops runtime image. The PyPI torch wheel pinned in pyproject.toml is a CUDA
# build that brings its own CUDA runtime, so on a host with the NVIDIA driver and
# the container toolkit `docker run --gpus all ...` trains on the GPU; without a
# GPU the same image runs on the CPU.
#
#   docker build -t rcnnops .
#   docker run --rm --gpus all -v "$PWD":/project rcnnops            # whole pipeline
#   docker run --rm --gpus all -v "$PWD":/project rcnnops rcnnops models
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends git make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/rcnnops
COPY pyproject.toml README.md ./
COPY src ./src
COPY pipelines ./pipelines
RUN pip install --no-cache-dir . \
 && useradd --create-home --uid 1000 rcnnops \
 && git config --system --add safe.directory '*'

USER rcnnops
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1
# The project (params.yaml, dvc.yaml, src/ for DVC's dependency hashes, data and
# outputs) is mounted here.
WORKDIR /project
CMD ["rcnnops", "run"]
