# The vectorsync code location: the user-code image of Dagster's Helm chart
# (`dagster-user-deployments`), and the image each run starts from (the K8sRunLauncher runs
# every run as a Kubernetes Job from the image of the code location that launched it).
#
#   docker build -t registry.example.com/vectorsync:$(git rev-parse --short HEAD) .
#
# docs/production.md shows the Helm values that deploy it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/var/lib/vectorsync/huggingface \
    VECTORSYNC_HOME=/var/lib/vectorsync

WORKDIR /opt/vectorsync

# The run-time user first, so that code changes do not recreate it. A numeric uid and gid, so
# that Kubernetes' runAsNonRoot can check them; --no-log-init: no lastlog/faillog records (sparse
# files that grow with the uid).
RUN groupadd --gid 10001 vectorsync \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir "$VECTORSYNC_HOME" vectorsync

# The CPU build of torch first. PyPI's Linux wheel of torch is the CUDA build (several GB), and
# requirements.lock pins torch==2.13.0+cpu, which only PyTorch's CPU index has. Point the
# argument at a mirror of that index if the build cannot reach it (the mirror must serve
# torch's dependencies too: filelock, fsspec, jinja2, networkx, setuptools, sympy, ...).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0

# Everything else at the versions tested together. dagster-k8s is not a dependency of the
# project: run workers need it because the Helm chart's dagster.yaml names the K8sRunLauncher.
# It is pinned to dagster-postgres's version (Dagster's libraries are released in step).
# PIP_INDEX_URL (unset by default: PyPI) lets a builder without PyPI point this step and the
# editable install's build backend (setuptools) at a mirror; pip reads it from the environment,
# and a build argument, unlike ENV, does not stay in the image (`docker history` shows it, so
# keep credentials out of it).
ARG PIP_INDEX_URL
COPY requirements.lock ./
RUN pip install -r requirements.lock dagster-k8s==0.29.27

# The project last, so a code or declaration change rebuilds only these layers. Editable
# because install reads sql/ beside the packages, and the code location reads the table
# declarations from orchestration/defs (or from $VECTORSYNC_TABLES, e.g. a mounted ConfigMap).
COPY pyproject.toml README.md workspace.yaml ./
COPY sql/ sql/
COPY assets/ assets/
COPY orchestration/ orchestration/
RUN pip install --no-deps -e .

# No root at run time; VECTORSYNC_HOME is the user's own writable directory.
USER 10001:10001

EXPOSE 3030
# CMD, not ENTRYPOINT: the Helm chart starts the container with `args: [dagster, api, grpc, -h,
# 0.0.0.0, -p, <port>, <dagsterApiGrpcArgs>...]`, which replace CMD but would be appended to an
# ENTRYPOINT. The same command serves `docker run -p 3030:3030 IMAGE` for a gRPC code server.
CMD ["dagster", "api", "grpc", "-m", "orchestration.definitions", "-h", "0.0.0.0", "-p", "3030"]
