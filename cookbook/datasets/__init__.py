"""Datasets: reading and validating JSONL rows, rendering them into token datums, and the data cursor a run
resumes from. The bundled toy datasets live in `bundled/` (named `bundled:<name>` in configs)."""
