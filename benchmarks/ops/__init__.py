"""Single ops: rope_append against the copy bandwidth, and every op timed with pytest-benchmark (test_micro)."""
