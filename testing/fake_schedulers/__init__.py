"""Fake PBS Professional and Slurm commands for tests: put ``BIN`` first on ``PATH`` and
``FAKE_BATCH_DIR`` in the commands' environment (the job table, see table.py).

    bin/qsub, qstat, qdel            pbs.py
    bin/sbatch, squeue, sacct, scancel  slurm.py

Each executable is a few lines that call the module under whichever Python 3 is on ``PATH``; with
``run_scripts`` set, a submitted job's script runs for real (runner.py), so a pilot can be started
through either batch system.
"""

from pathlib import Path

BIN = Path(__file__).resolve().parent / "bin"
