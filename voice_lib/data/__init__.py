"""Data: decoding, speech analysis, text frontend, staging uploads, QC, corpus, features, datasets."""
