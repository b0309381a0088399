# syntax=docker/dockerfile:1
# The training image: Python 3.11 with the pinned stack of requirements.txt /
# constraints.txt and the `trainer` package, for Vertex AI custom jobs.  Vertex's
# prebuilt TensorFlow images stop at TF 2.17 / Python 3.10, hence our own.
#
#   docker build -t IMAGE .                    # Vertex AI (default target)
#   docker build --target dataflow -t IMAGE .  # also a Dataflow SDK container
#
# run-cloud.sh builds the default target with `gcloud builds submit --tag IMAGE .`.
# The job config (config.yaml) sets the container `command` itself, so either
# target runs the trainer on Vertex AI.  Only the stages a target needs are built
# (BuildKit, the default builder since Docker 23).
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
# g++ builds the trainer's C++ ops (trainer/fused.py).
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# Pins before code: editing trainer/ does not reinstall TensorFlow and Beam.
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt
COPY setup.py ./
COPY trainer/ trainer/
# --no-deps: everything is installed above, at the pinned versions.
RUN pip install --no-deps . && pip check
# Build the C++ ops now, so a job does not spend 10-20 s compiling them.
RUN cd / && python -m trainer.fused

# Dataflow custom SDK container: pass --sdk_container_image IMAGE
# --sdk_location container to preprocess.py (instead of --setup_file ./setup.py).
# It stays root: Dataflow mounts worker directories owned by root and expects
# the SDK harness to write to them.
FROM base AS dataflow
COPY --from=beam-sdk /opt/apache/beam /opt/apache/beam
ENTRYPOINT ["/opt/apache/beam/boot"]

# Vertex AI: runs as an unprivileged user; outputs go to gs://, /tmp stays writable.
FROM base AS trainer
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin trainer
USER trainer
ENTRYPOINT ["python", "-m", "trainer.task"]
