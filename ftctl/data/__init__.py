"""The data stage: the labelled examples ftctl trains and tests on, and where they come from.

Where to look:

``examples.py``   read, validate and write JSONL/CSV (the seed's two formats), every problem
                  with file:line
``textkey.py``    the one definition of "the same text" (NFKC, whitespace, the model's
                  tokenizer)
``reconcile.py``  across files: relabels and repeats between new, old and reviewed data
``generate.py``   templates -> balanced training data (``ftctl data generate``)
``harvest.py``    the live service's doubtful answers -> a review file (``ftctl harvest``)
``review.py``     the filled-in review file -> the reviewed data (``ftctl data import-review``)

Imports only the shared base (config, errors, fsutil), never the other stages.
"""
