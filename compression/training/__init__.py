"""Training-time and evaluation code, kept apart from the serving format.

The service imports only the top of :mod:`compression` (format, codecs, index, allocation,
policies, kernels).  What lives here is used while a model trains or is evaluated:

- :mod:`.methods`: compression methods as ``torch.nn.Module`` embeddings (MPE, BH, FIITED,
  hashing, QR) that export into the serving format, and the post-training recipes;
- :mod:`.models`: the small CTR model the quality benchmark trains;
- :mod:`.datasets`: MovieLens-100k, Criteo TSV and synthetic CTR data;
- :mod:`.evaluation`: AUC, logloss, RMSE and the train / evaluate loops;
- :mod:`.sensitivity`: model-aware error for the allocator (how far a choice moves the logits).
"""
