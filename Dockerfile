# LLM Parallelism Labs: one image for every node of a run (scripts/deploy_nodes.sh starts it).
#   CPU (default):  docker build -t llm-labs .
#   CUDA:           docker build -t llm-labs --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#                     --build-arg DS_ACCELERATOR=cuda --build-arg PREBUILD_CPU_OPS=0 .
# `docker run IMAGE --no_ssh ...` runs deepspeed with those flags; `docker run IMAGE labs plan ...`,
# `docker run IMAGE bash` run the command given.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG DEEPSPEED_VERSION=0.19.8
ARG DS_ACCELERATOR=cpu
# JIT-build DeepSpeed's CPU comm op into the image (else every container start compiles it, ~70 s)
ARG PREBUILD_CPU_OPS=1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_ACCELERATOR=${DS_ACCELERATOR} \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions

# g++ for DeepSpeed's JIT-built ops, numactl for --bind_cores_to_rank, pdsh/ssh for the multi-host runner.
# Debian package versions are not pinned: they follow the base image's point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libc6-dev numactl pdsh openssh-client \
    && rm -rf /var/lib/apt/lists/*

# torch first (pinned, from the chosen index), then deepspeed built against it (no build isolation).
RUN pip install --no-cache-dir "setuptools>=70" "wheel>=0.43" \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

RUN useradd --create-home --uid 1000 --user-group labs \
    && mkdir -p /opt/torch_extensions /app/runs \
    && chown labs:labs /opt/torch_extensions /app/runs

WORKDIR /app
COPY --chown=labs:labs . /app
RUN pip install --no-cache-dir . \
    && chmod 755 /app/scripts/container_entry.sh

USER 1000:1000
RUN if [ "${PREBUILD_CPU_OPS}" = 1 ] && [ "${DS_ACCELERATOR}" = cpu ]; then \
        python -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"; \
    fi

ENTRYPOINT ["/app/scripts/container_entry.sh"]
CMD ["--help"]
