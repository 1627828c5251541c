"""Generation: prefill the prompt once, then one cached decode step per new token (`generate`),
choosing each token greedily or by sampling (`sampling`); ids in, text out."""
