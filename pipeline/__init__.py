"""fsr-pipe: offline batch pipeline for style-diversified image retrieval (FreestyleRet)."""

import os

# MKL's strict reproducible mode: a matrix product gives the same bits whatever the number of
# threads, so a unit computes the same Parquet bytes inline (all cores) or in a pool worker
# (a share of them). Must be set before torch loads MKL; docs/distributed.md.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
