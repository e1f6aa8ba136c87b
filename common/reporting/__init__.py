"""From result CSVs to what a reader sees: statistics, run results, the paper's numbers, comparison
tables, figures and Markdown."""
