# The ftctl training image: CUDA PyTorch runtime + pinned dependencies + ftctl.
#
#   ftctl image build                        # tags ftctl:<version>-<git sha> and ftctl:latest
#   ftctl train --docker --gpus all ...      # runs the same command in it
#
# BASE_IMAGE must carry Python 3.11 with torch (2.8-2.13) and pip on PATH; it is pinned by
# digest (pytorch/pytorch 2.9.1 + CUDA 12.8 + cuDNN 9: covers Hopper). torch comes from the base,
# everything else is pinned by docker/constraints.txt. Nothing here needs a custom CA bundle: a
# base that must reach PyPI through an intercepting proxy carries PIP_CERT itself (the test base
# does, see docs/docker.md).
#
# Few instructions on purpose: the classic builder makes a container for every step, and a vfs
# storage driver copies the whole image for each. Steps that depend only on the base come first
# (cached forever), then dependencies (cached until pyproject.toml/constraints change), then the
# source (the only thing rebuilt on a code change).
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
    TOKENIZERS_PARALLELISM=false \
    CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    PYTHONHASHSEED=0 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    LANG=C.UTF-8
WORKDIR /workspace
ENTRYPOINT ["ftctl"]

# 1) dependencies only
COPY pyproject.toml README.md* docker/constraints.txt /opt/ftctl/
RUN cd /opt/ftctl \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && python -m pip install -c constraints.txt setuptools -r /tmp/requirements.txt \
 && python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
 && rm -f /tmp/requirements.txt \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --no-create-home --home-dir /tmp --shell /bin/sh ftctl) \
 && mkdir -p /workspace/data /workspace/models \
 && chmod 0777 /workspace /workspace/data /workspace/models

# 2) the project itself (no dependency resolution)
COPY ftctl/ /opt/ftctl/ftctl/
RUN cd /opt/ftctl \
 && touch -a README.md \
 && python -m pip install --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info \
 && ftctl --version

USER 1000
