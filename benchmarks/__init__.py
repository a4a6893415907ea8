"""Side-by-side speed/accuracy benchmarks: ``python -m benchmarks`` (not in ``make test``)."""
