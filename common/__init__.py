"""Shared library of the PRESENCE reproduction. Stage scripts (01_data/ ... 05_figures/) import from here
and hand results to each other through files only.

  presence/    the method: self-influence, weights and tau schedules, the training step
  data/        corpus, tokenizer, span corruption, packed data, probe sets
  evaluation/  XTREME readers, metrics, fine-tuning, retrieval
  reporting/   statistics, run results, the paper's numbers, tables, figures
and at the top the shared basics: config, paths, io, checkpoint, runinfo, signals, distributed, seeding,
modeling, optim (+ adafactor), benchmark."""
