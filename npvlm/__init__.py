"""npvlm: PaliGemma as explicit NumPy/CuPy array math, equal to Hugging Face transformers.

    import npvlm
    model = npvlm.load("demo")                        # a folder, a Hub id, or "demo"
    print(model.generate("scene.png", "caption en").text)

The package by folder (docs/architecture.md draws the arrows between them):

    model/        the model math, forward and backward, NumPy only: layers, rope, masks,
                  attention, kv_cache, siglip, gemma, paligemma, loss, record
    inputs/       image -> pixel_values, text -> token ids, the processor's batch
    loading/      a model folder or Hub id -> the checked parameter tree
    generation/   prefill once, then decode token by token; sampling
    training/     which gradients, optimizers, LoRA, the fine-tuning loop
    evaluation/   a model's answers to JSONL examples, scored by each task's metric
    saving/       a checkpoint in the input's layout; atomic file writes
    tasks/        detection boxes, segmentation masks, drawing them
    metrics/      the scores PaliGemma is judged by: VQA accuracy, ANLS, CIDEr, mAP, mIoU...
    demo/         the embedded demo model and its shape world
    api.py        npvlm.load and PaliGemma;  cli.py, finetune.py, evaluate.py: the commands
    config.py, errors.py, backend.py, tree.py: what every folder may use; parity.py: the checks

`import npvlm` imports none of them: each public name is imported when it is first used.
"""

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "load": "api", "PaliGemma": "api",
    "load_config": "config", "PaliGemmaConfig": "config", "TextConfig": "config", "VisionConfig": "config",
    "NpvlmError": "errors", "ConfigError": "errors", "CheckpointError": "errors", "InputError": "errors",
    "BackendError": "errors", "set_threads": "cpu",
}

__all__ = list(_PUBLIC)


def __getattr__(name):
    """`npvlm.load` and the other public names, and the submodules (`npvlm.errors`,
    `npvlm.model`, ...): imported on first use (PEP 562)."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'npvlm' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
