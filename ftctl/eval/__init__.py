"""The eval stage: the comprehensive test (seed: ``comprehensive_test.py 500 12345``) and the
forgetting gate, candidate against the live model on the very same cases.

Where to look:

``evaluate.py``  ``run_eval``: one run end to end, the report dict (schema in docs/eval.md)
``cases.py``     the test pool, checked, and the seeded stratified draw
``metrics.py``   accuracy, per-intent recall/F1, confusion matrix, confused pairs, flips
``gate.py``      the gate: a drop beyond ``max_drop`` AND significant (exact McNemar)
``leakage.py``   test cases the candidate was trained on
``report.py``    report.json, report.md, and the verdict beside the model (eval_report.json)
``plots.py``     the confusion matrix and the before/after plot (PNG)

Imports the shared base, ftctl.data (the test pool, "the same text") and ftctl.model
(loading, :func:`ftctl.model.inference.predict`).
"""
