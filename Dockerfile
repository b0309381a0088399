# syntax=docker/dockerfile:1
# The project's images: Python 3.11 with the pinned stack of requirements.txt /
# constraints.txt and the `trainer` package.  Three targets share the `base` stage:
#
#   docker build --target trainer -t IMAGE .   # Vertex AI custom jobs (the default target)
#   docker build --target dataflow -t IMAGE .  # Dataflow custom SDK container
#   docker build --target serving -t IMAGE .   # Vertex AI prediction (custom container)
#
# run-cloud.sh builds all three in one Cloud Build (cloudbuild.yaml), each with
# BuildKit, which builds only the stages the target needs.  Vertex's prebuilt
# TensorFlow images stop at TF 2.17 / Python 3.10 (training) and 2.15 (prediction),
# hence our own: training, preprocessing and serving run the same TensorFlow.
ARG PYTHON_IMAGE=python:3.11-slim
# Must match the apache-beam pin: Dataflow starts workers with this SDK's boot binary.
ARG BEAM_SDK_IMAGE=apache/beam_python3.11_sdk:2.77.0

FROM ${BEAM_SDK_IMAGE} AS beam-sdk

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MOVIELENS_KERNEL_CACHE=/opt/movielens/kernels \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/movielens
# g++ builds the trainer's C++ ops (trainer/ops/kernels.py).
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# Pins before code: editing trainer/ does not reinstall TensorFlow and Beam.
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt
COPY setup.py ./
COPY trainer/ trainer/
# The pipeline's extract and preprocess steps (scripts/pipeline.py) run these.
COPY data-extractor.py preprocess.py ./
# --no-deps: everything is installed above, at the pinned versions.
RUN pip install --no-deps . && pip check
# Build the C++ ops now, so a job does not spend 10-20 s compiling them.
RUN cd / && python -m trainer.ops

# Dataflow custom SDK container: run-cloud.sh passes --sdk_container_image IMAGE
# --sdk_location container to preprocess.py (--dataflow-setup-file: --setup_file
# ./setup.py instead, and the workers pip-install the stack at start-up).
# It stays root: Dataflow mounts worker directories owned by root and expects
# the SDK harness to write to them.
FROM base AS dataflow
COPY --from=beam-sdk /opt/apache/beam /opt/apache/beam
ENTRYPOINT ["/opt/apache/beam/boot"]

# Vertex AI prediction: Vertex's custom-container contract (AIP_HTTP_PORT,
# AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE, the model in AIP_STORAGE_URI); see
# trainer/serving/server.py.  8080 is Vertex's default port.
FROM base AS serving
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin serving
USER serving
EXPOSE 8080
ENTRYPOINT ["python", "-m", "trainer.serving"]

# Vertex AI training: runs as an unprivileged user; outputs go to gs://, /tmp
# stays writable.  A tuning trial writes its metric where CLOUD_ML_HP_METRIC_FILE
# says: /var/hypertune on Vertex AI, which only root could write
# (GoogleCloudPlatform/cloudml-hypertune issue 6), or cloudml-hypertune's default
# /tmp/hypertune; both directories belong to the trainer user.  Last, so a plain
# `docker build .` builds this target.
FROM base AS trainer
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin trainer \
    && install -d -o trainer -g trainer -m 0755 /var/hypertune /tmp/hypertune
USER trainer
ENTRYPOINT ["python", "-m", "trainer.task"]
