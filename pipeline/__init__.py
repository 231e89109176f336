"""fsr-pipe: offline batch pipeline for style-diversified image retrieval (FreestyleRet)."""

__version__ = "0.1.0"
