#!/bin/sh
# The image's dependency layer (Dockerfile step 1): every package of docker/constraints.txt at
# its exact version, with torch held at the base image's own build. Nothing else reaches this
# step, so only a change of dependencies (this script or the constraints) reinstalls them.
set -eu
here=$(dirname "$0")

# torch comes from BASE_IMAGE (its CUDA build and the nvidia-* libraries that match it). Read
# the exact version there and pin it, so pip can never swap it for another build.
torch_version=$(python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null) || {
  echo "error: the base image has no torch: BASE_IMAGE must carry Python 3.11 with torch" \
       "(2.8-2.13) and pip, e.g. pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime" >&2
  exit 1
}
echo "torch==${torch_version}" > /tmp/torch-from-base.txt
echo "base image: $(python --version 2>&1), torch ${torch_version}"

python -m pip install -c /tmp/torch-from-base.txt -r "$here/constraints.txt"
rm -f /tmp/torch-from-base.txt

# the image's default user (uid 1000) and the mount points of `--docker`
getent passwd 1000 >/dev/null \
  || useradd --uid 1000 --user-group --no-create-home --home-dir /tmp --shell /bin/sh ftctl
mkdir -p /workspace/data /workspace/models
chmod 0777 /workspace /workspace/data /workspace/models
