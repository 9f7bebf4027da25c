"""Task data sources: simulated HPO patients, a GMDB-format folder, simulated nuclei, PanNuke.

Each returns a `mint.data.task_data.TaskData`. Submodules are imported where used
(`python -m mint.data.example_prefs` must not be imported before it runs).
"""
