# rcnnops runtime image: CUDA-enabled PyTorch, the package with the same pins as
# pyproject.toml, a non-root user, and the retraining flow as the default command.
#
# The pinned PyPI torch wheel is a CUDA 12 build that brings its own CUDA runtime
# and cuDNN, so the base image needs no CUDA toolkit: on a host with the NVIDIA
# driver and the NVIDIA container toolkit, `--gpus all` trains on the GPUs (CUDA
# + AMP); without them the same image runs on the CPU.
#
#   docker build -t rcnnops .
#   docker run --rm --gpus all -v "$PWD":/project rcnnops                  # the whole flow
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD":/project rcnnops     # as you
#   docker run --rm --gpus all -v "$PWD":/project rcnnops rcnnops compare
#   docker run --rm --gpus all --ipc=host -v "$PWD":/project rcnnops \
#       torchrun --standalone --nproc_per_node 4 -m rcnnops.cli train --variant mask_rcnn
#   docker run --rm -v "$PWD":/project -v /mnt/dvc-remote:/remote \
#       -e RCNNOPS_DVC_REMOTE=/remote -e MLFLOW_TRACKING_URI=http://mlflow:5000 rcnnops
#
# tests/code/test_packaging.py checks that the pins below match pyproject.toml.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN apt-get update \
 && apt-get install -y --no-install-recommends git make \
 && rm -rf /var/lib/apt/lists/*

# torch first, in a layer of its own (5.5 GB; it changes least often).
RUN pip install torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/rcnnops
COPY pyproject.toml README.md ./
COPY src ./src
COPY pipelines ./pipelines
RUN pip install . \
 && useradd --create-home --uid 1000 rcnnops \
 && git config --system --add safe.directory '*'

USER rcnnops
# Prefect's local database (in the user's ~/.prefect), made and migrated now: a
# container starts from a fresh home, and the first run's temporary Prefect server
# would otherwise spend about 13 s migrating it (18.6 s to answer instead of 5.4 s
# on 2 CPU cores), every `docker run`.
RUN prefect server database upgrade -y
# Likewise the empty MLflow store a new project's mlflow.db is copied from
# (~/.cache/rcnnops): MLflow's migrations of every new store, about 1 s, once here.
RUN python -c "from rcnnops.store_template import empty_store; print(empty_store())"
# Any uid may run the image (`docker run -u "$(id -u):$(id -g)"` so that files in
# the mounted project are the caller's; OpenShift's arbitrary uids): HOME stays
# this home, which every uid may write (the databases above, caches), and a uid
# with no name gets `uid<N>` from rcnnops (DVC fails without a user name).
ENV HOME=/home/rcnnops
RUN chmod -R a+rwX /home/rcnnops
# The project (params.yaml, dvc.yaml, src/ for DVC's dependency hashes, data and
# outputs) is mounted here; the MLflow store defaults to /project/mlflow.db.
WORKDIR /project
CMD ["rcnnops", "run"]
