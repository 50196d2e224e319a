# The ftctl training image: CUDA PyTorch runtime + pinned dependencies + ftctl.
#
#   ftctl image build                        # tags ftctl:<version>-<git sha> and [image] tag
#   ftctl train --docker --gpus all ...      # runs the same command in [image] tag
#
# BASE_IMAGE must carry Python 3.11 with torch (2.8-2.13) and pip on PATH; it is pinned by
# digest (pytorch/pytorch 2.9.1 + CUDA 12.8 + cuDNN 9: covers Hopper). torch is the base's own:
# the build reads its version there and pins it (a base without torch is an error, never a
# silent multi-GB download); everything else is pinned by docker/constraints.txt, and
# `pip check` proves the result consistent. Nothing here needs a custom CA bundle: a base that
# must reach PyPI through an intercepting proxy carries PIP_CERT itself (the test bases do).
# `ftctl image build` adds OCI labels (org.opencontainers.image.revision = the git commit).
#
# Few instructions on purpose: the classic builder makes a container for every step. Steps that
# depend only on the base come first (cached forever), then the dependencies, built from
# docker/ alone (cached until the constraints change), then the source (the only thing rebuilt
# on a code change; a README change rebuilds nothing: it never reaches the build).
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime@sha256:7b324d212a4450795b49edba9949b7cdc72429148a64e974334bfe5774d51385
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    TRANSFORMERS_VERBOSITY=error \
    TOKENIZERS_PARALLELISM=false \
    CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    PYTHONHASHSEED=0 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    LANG=C.UTF-8
WORKDIR /workspace
ENTRYPOINT ["ftctl"]

# 1) dependencies: docker/constraints.txt (+ the script that installs it) and nothing else
COPY docker/constraints.txt docker/install-deps.sh /opt/ftctl/docker/
RUN sh /opt/ftctl/docker/install-deps.sh

# 2) the project itself (no dependency resolution; pip check: pyproject's needs are all met)
COPY pyproject.toml /opt/ftctl/
COPY ftctl/ /opt/ftctl/ftctl/
RUN cd /opt/ftctl \
 && touch README.md \
 && python -m pip install --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info README.md \
 && python -m pip check \
 && ftctl --version

USER 1000
