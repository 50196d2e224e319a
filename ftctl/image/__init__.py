"""The image stage: the reproducible CUDA training image, through the docker SDK.

Where to look:

``build.py``      build the image (Dockerfile, pinned base, OCI labels), list it, find it
``container.py``  one ftctl command inside the image (``--docker``), followed to its end:
                  output by offset, GPUs, /dev/shm, stopping gently, the OOM killer

The paths across the container boundary (container path -> the user's host path) are
:mod:`ftctl.hostpaths`, in the shared base: the manifest records host paths too. Imports the
shared base and :mod:`ftctl.train.distributed` (the stop grace it passes to torchrun).
"""
