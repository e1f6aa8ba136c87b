"""Shared library of the PRESENCE reproduction: paths, configs, I/O, run bookkeeping and the
algorithms every stage uses. Stage scripts (01_data/ ... 05_figures/) import from here and hand
results to each other through files only."""
