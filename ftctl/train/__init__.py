"""The train stage: the incremental fine-tune (the seed's incremental_finetune.py) as steps.

Where to look:

``finetune.py``     ``train(cfg)``: the steps in order, from the inputs to OUTPUT/final/
``fit.py``          the training loop: optimizer, epochs, early stopping, checkpoints
``features.py``     tokenized rows, this process's share, length-bucketed batches
``checkpoint.py``   what --resume reads: trainable weights, optimizer, RNG states
``distributed.py``  several processes (``--nproc``/``--nnodes``): torchrun, DDP
``base.py``         ``ftctl base``: the stand-in base model, trained from scratch

Imports the shared base, ftctl.data (the examples) and ftctl.model (loading and saving).
"""
