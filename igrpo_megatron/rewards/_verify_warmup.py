"""Imported once by the verification pool's fork server, to warm it up.

Running the warm-up verifications here fills sympy's and math-verify's lazy imports and caches in the
fork server itself, so every worker forked from it, and every replacement of a worker killed at its
deadline, starts warm: a replacement costs a fork (milliseconds) instead of about a second of CPU on
the critical path of the batch it joins.
"""

from igrpo_megatron.rewards._verify_worker import warm_up

warm_up()
