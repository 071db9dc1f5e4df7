"""The model store behind ``deltakit registry import`` and the service's registry: fine-tunes kept as
deltas against their bases, everything else whole, every original file's SHA-256 recorded."""
