"""``ftctl demo``: the seed's whole workflow and its loop, on the shipped data, on this machine.

Where to look:

``run.py``          ``run_demo``: generate -> base -> eval -> two local servers -> traffic ->
                    harvest -> review -> fine-tune -> gate -> deploy -> promote, and the tables
                    of what changed
``localserver.py``  the local servers it deploys to: a real sshd, supervisor and
                    ``ftctl serve`` on loopback (the benchmarks and the tests use them too)

Imports every stage (it runs all of them) and the shared base; no stage imports it.
"""
