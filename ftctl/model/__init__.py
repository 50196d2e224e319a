"""A model directory: what train writes and eval, deploy and serve read.

A plain Hugging Face directory (config.json with id2label/label2id, model.safetensors,
tokenizer files) plus ``vocab.txt`` and, for ftctl outputs, ``manifest.json``
(:mod:`ftctl.manifest`).

Where to look:

``files.py``      load and save a BERT-family classifier: weight formats, dtypes, tokenizer
                  files kept byte for byte
``labels.py``     the label space: id2label, generic ``LABEL_i`` names and ``--label-map``
``inference.py``  the device a model runs on, and texts through it in batches (eval, serve)

Imports only the shared base (errors, fsutil).
"""
