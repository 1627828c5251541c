"""config.json parsing: real hub configs, PaliGemma 2 quirks, and errors that name the field."""

import copy
import json

import pytest

from npvlm.config import config_from_dict, load_config
from npvlm.errors import ConfigError

# google/paligemma-3b-pt-224 config.json as written by the converter (docs/spec.md §2.1)
PG1_224 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "ignore_index": -100,
    "image_token_index": 257152, "hidden_size": 2048, "projection_dim": 2048,
    "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
                    "num_attention_heads": 8, "num_key_value_heads": 1, "num_hidden_layers": 18,
                    "num_image_tokens": 256, "vocab_size": 257216, "torch_dtype": "float32"},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152,
                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                      "num_image_tokens": 256, "patch_size": 14, "projection_dim": 2048,
                      "projector_hidden_act": "gelu_fast", "vision_use_head": False},
    "torch_dtype": "float32",
}

# google/paligemma2-3b-pt-448 style: no top-level hidden_size, num_positions keyed by LLM size
PG2_448 = {
    "model_type": "paligemma", "image_token_index": 257152, "bos_token_id": 2, "eos_token_id": 1,
    "pad_token_id": 0, "projection_dim": 2304,
    "text_config": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 26,
                    "head_dim": 256, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                    "final_logit_softcapping": 30.0, "sliding_window": 4096,
                    "vocab_size": 257216, "hidden_activation": "gelu_pytorch_tanh"},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 448,
                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                      "num_positions": 256, "patch_size": 14, "projection_dim": 2304},
}


def test_paligemma1_config_uses_hf_defaults_only_for_omitted_fields():
    cfg = config_from_dict(PG1_224)
    assert cfg.num_image_tokens == 256 and cfg.vision.image_size == 224
    assert cfg.text.head_dim == 256 and cfg.text.rope_theta == 10000.0
    assert cfg.text.max_position_embeddings == 8192 and cfg.text.rms_norm_eps == 1e-6
    assert cfg.text.attn_scale == 256 ** -0.5 and cfg.image_token_index == 257152
    assert cfg.vision.intermediate_size == 4304  # not PaliGemmaConfig's 4096 default


def test_paligemma2_config_quirks():
    cfg = config_from_dict(PG2_448)
    assert cfg.text.hidden_size == 2304           # text_config, not the missing top-level field
    assert cfg.num_image_tokens == 1024           # image_size // patch_size, not num_positions
    assert cfg.text.attn_scale == 256 ** -0.5 and cfg.text.sliding_window == 4096


def test_transformers5_rope_parameters():
    d = copy.deepcopy(PG1_224)
    d["text_config"]["rope_parameters"] = {"rope_theta": 500.0, "rope_type": "default"}
    assert config_from_dict(d).text.rope_theta == 500.0


@pytest.mark.parametrize("section, field", [
    ("vision_config", "hidden_size"), ("vision_config", "patch_size"),
    ("vision_config", "intermediate_size"), ("text_config", "vocab_size"),
    ("text_config", "num_hidden_layers"), ("text_config", "hidden_size"),
    (None, "image_token_index"),
])
def test_missing_required_field_is_named(section, field):
    d = copy.deepcopy(PG1_224)
    del (d[section] if section else d)[field]
    with pytest.raises(ConfigError, match=field):
        config_from_dict(d)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(model_type="llava"), "model_type"),
    (lambda d: d["text_config"].update(model_type="llama"), "text_config.model_type"),
    (lambda d: d["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda d: d["vision_config"].update(image_size=225), "image_size"),
    (lambda d: d["text_config"].update(hidden_act="relu"), "hidden_act"),
    (lambda d: d["vision_config"].update(hidden_size="1152"), "vision_config.hidden_size"),
    (lambda d: d["vision_config"].update(projection_dim=1024), "projection_dim"),
    (lambda d: d.pop("vision_config"), "vision_config"),
])
def test_config_that_cannot_be_paligemma(change, message):
    d = copy.deepcopy(PG1_224)
    change(d)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(d)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json: file not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(PG1_224))
    assert load_config(tmp_path).text.num_hidden_layers == 18


def test_gemma2_layer_types():
    cfg = config_from_dict(PG2_448)
    assert cfg.text.layer_types[:3] == ("sliding_attention", "full_attention", "sliding_attention")
    d = copy.deepcopy(PG2_448)
    d["text_config"]["layer_types"] = ["full_attention"] * 26
    assert config_from_dict(d).text.layer_type(0) == "full_attention"
    d["text_config"]["layer_types"] = ["full_attention"] * 3
    with pytest.raises(ConfigError, match="layer_types"):
        config_from_dict(d)
    del d["text_config"]["layer_types"], d["text_config"]["query_pre_attn_scalar"]
    with pytest.raises(ConfigError, match="query_pre_attn_scalar"):
        config_from_dict(d)
