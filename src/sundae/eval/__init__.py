"""Evaluation: sample and tokenizer metrics (`metrics`), the FID Inception-V3 network (`inception`), the judge
classifier (`classifier`) and the `sundae evaluate` protocol (`protocol`: reference sets, sampling, results
with what makes them reproducible; its plots are `sundae.plots`)."""
