"""Why the model said each word: for every answer token its log-probability, the attention of
its query over the image, its gradient with respect to the pixels and the logit lens
(`attribute`), the per-patch maps derived from them (`maps`); `PaliGemma.explain` runs it
(docs/interpretability.md)."""
