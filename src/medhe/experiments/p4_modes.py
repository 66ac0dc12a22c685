"""The P4 randomness modes, apart from the experiment so the CLI can list them without importing torch."""

MODES = ("fresh", "image", "global")
