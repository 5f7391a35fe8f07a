"""hjserve evaluation suite: ``python -m eval.run`` regenerates ``eval/RESULTS.md`` and its plots."""
