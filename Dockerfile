# One image for every rerankq process. The default build is for CPUs; the GPU build (see
# docker-compose.yml) starts from a CUDA runtime image and installs a CUDA build of torch:
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg EXTRAS='[gpu]' .
ARG BASE=python:3.12-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""
# The CUDA images carry no Python; the slim one does.
RUN command -v python3 >/dev/null && python3 -m venv --help >/dev/null 2>&1 \
    || (apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/rerankq
ENV PATH=/opt/rerankq/bin:$PATH PYTHONUNBUFFERED=1
# torch first, from the index matching the base, so the project's torch range is already met.
RUN pip install --no-cache-dir torch --index-url ${TORCH_INDEX}
# The sources go to /src, outside every process's working directory: rerankq runs as the one installed package.
WORKDIR /src
COPY pyproject.toml README.md celeryconfig.py ./
COPY tasks tasks
COPY worker worker
COPY producer producer
COPY server server
COPY integrations integrations
COPY rerankq rerankq
# The celery and kombu that CI tests, within pyproject.toml's bounds (tests/test_compose.py checks they agree).
ARG CELERY_VERSION=5.7.0
ARG KOMBU_VERSION=5.7.0
RUN pip install --no-cache-dir ".${EXTRAS}" "celery==${CELERY_VERSION}" "kombu==${KOMBU_VERSION}" \
    && useradd --create-home --uid 10001 rerankq
# Numeric, so that Kubernetes can check runAsNonRoot (deploy/helm).
USER 10001
WORKDIR /home/rerankq
# Models downloaded from the hub are kept here (a volume in docker-compose.yml).
ENV HF_HOME=/home/rerankq/.cache/huggingface
ENTRYPOINT ["rerankq"]
