"""The reference LM trainer: `python -m fastattn.lm {train,eval,sample}` (see __main__)."""
