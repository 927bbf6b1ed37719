"""Benchmarks of mole: `make bench` (``python -m bench.run_all``) writes bench/results/latest.json and latest.md.

Idle OpenMP threads wait passively here (``OMP_WAIT_POLICY=PASSIVE`` unless the caller set it): these machines
have 2 cores shared with other work, and with libgomp's default spin-waiting a 2-thread torch run stalls at
every parallel region whose other thread has been descheduled, so wall times then measure the number of
parallel regions more than the work (a mid-size UNet forward went from ~0.4 s to 1.7–3.2 s under a load of
~3, and MoLE/base from 1.28 to 1.66–2.3). This must be set before torch loads libgomp, hence here: every
benchmark runs as ``python -m bench.<name>``, which imports this package first. Where torch is already loaded
(a test importing bench) it would change nothing here, so the environment is left alone.
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
