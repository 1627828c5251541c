"""Model inputs on the host: images -> pixel_values (`image`), text -> token ids (`tokenizer`),
and both -> the batch dict the model takes (`processor`), as transformers' PaliGemmaProcessor."""
