"""Pre-training data: corpus sources, the tokenizer, T5 span corruption, packed memory-mapped rows and
the probe sets of the self-influence analysis."""
