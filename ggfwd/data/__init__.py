"""Demo data shipped with ggfwd (package data; see sst2/README.md)."""
