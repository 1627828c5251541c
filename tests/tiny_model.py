"""A random-weight PaliGemma folder written with NumPy only (no torch), for tests of the API,
the CLI and error handling. Not a golden: nothing here claims what the right output is."""

import json
import shutil
from pathlib import Path

import numpy as np
import sentencepiece as spm

from npvlm.config import config_from_dict
from npvlm.safetensors_io import write_safetensors
from npvlm.weights import expected_shapes

FIXTURE_TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "tokenizer" / "tokenizer.model"


def tiny_config(image_token_index, vocab_size, image_size=28, max_positions=64):
    return {
        "model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
        "image_token_index": image_token_index, "pad_token_id": 0, "eos_token_id": 1,
        "bos_token_id": 2, "projection_dim": 32,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16,
                          "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": image_size, "patch_size": 14, "projection_dim": 32},
        "text_config": {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 48,
                        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                        "head_dim": 16, "vocab_size": vocab_size,
                        "max_position_embeddings": max_positions},
    }


def write_random_model(folder, seed=0, image_size=28, max_positions=64, tokenizer=FIXTURE_TOKENIZER):
    """Write config.json, model.safetensors (hub names, F32) and tokenizer.model into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    vocab = (pieces + 2 + 63) // 64 * 64           # HF: <image> + 1, padded to a multiple of 64
    d = tiny_config(pieces, vocab, image_size, max_positions)
    cfg = config_from_dict(d)
    rng = np.random.default_rng(seed)
    tensors = {name: (rng.normal(size=shape) * 0.3).astype(np.float32)
               for name, shape in expected_shapes(cfg).items()}
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    write_safetensors(folder / "model.safetensors", tensors)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return folder
