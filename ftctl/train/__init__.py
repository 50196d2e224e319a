"""The train stage: the incremental fine-tune (the seed's incremental_finetune.py) as steps.

Where to look:

``finetune.py``     ``train(cfg)``: the steps in order, from the inputs to OUTPUT/final/
``inputs.py``       step 1: the model directory, the data and the labels, checked
``layers.py``       step 2: the classifier as training holds it (frozen prefix, grown head,
                    the forward split in two)
``mix.py``          step 3: replay of old data, the stratified validation split
``features.py``     step 3: tokenized rows, this process's share, the frozen prefix's cache,
                    length-bucketed batches
``fit.py``          step 4: the training loop: optimizer, epochs, early stopping, checkpoints
``numerics.py``     precision (fp32/bf16), deterministic kernels, CUDA out of memory
``output.py``       step 5: OUTPUT/final/, its manifest, the result reported
``checkpoint.py``   what --resume reads: trainable weights, optimizer, RNG states
``distributed.py``  several processes (``--nproc``/``--nnodes``): torchrun, DDP
``base.py``         ``ftctl base``: the stand-in base model, built and trained from scratch

Imports the shared base, ftctl.data (the examples) and ftctl.model (loading and saving).
"""
