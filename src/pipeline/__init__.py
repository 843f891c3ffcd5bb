"""The experiment pipeline: resolve a run, train its folds (one process or several), publish, track, score,
ensemble, predict and export."""
