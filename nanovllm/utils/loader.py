"""Finds a model (Hugging Face folder, llama2.c checkpoint, short name), builds the decoder, loads its weights."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nanovllm.config import ModelConfig
from nanovllm.errors import ModelFormatError
from nanovllm.layers.quantization import INT4_GROUP_SIZES, quantize_model_
from nanovllm.layers.rotary import rope_inv_freq
from nanovllm.models import CHECKPOINT_NAMES, CausalLM, build_model, checkpoint_tensors
from nanovllm.models.fused import fuse_projections_
from nanovllm.models.sharding import Collectives, parallelize_, row_max, shard_config, shard_tensor
from nanovllm.utils.llama2c import read_llama2c
from nanovllm.utils.tokenizer import HFTokenizer, Llama2cTokenizer, Tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHORT_NAMES = {"default": ASSETS / "default"}  # models that ship inside the package

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


TensorMap = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """The weights' dtype: float32 (the default), bfloat16 or float16, by name or as a torch.dtype."""
    if dtype is None:
        return torch.float32  # the safe default on CPU: bf16 matmuls are slow on many CPUs
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():  # float8, float64, integers: torch has them, the model does not run in them
            raise ValueError(f"dtype {dtype} is not supported; choose torch.float32, torch.bfloat16 or torch.float16")
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a string or a torch.dtype, got {dtype!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str | torch.device) -> None:
    """Refuse, in words, a device this machine or this torch build cannot use (before any weight is read)."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', or a torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device (try 'cpu' or 'cuda'): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r} is not available: {why}; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif dev.type != "cpu":  # 'meta' included: it holds shapes, not numbers, so nothing could be generated
        raise ValueError(f"device {device!r} is not supported: nanovllm runs on 'cpu' or 'cuda'")


def load_state_dict_into(model: CausalLM, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy checkpoint tensors into the model, checking names and shapes; a tied lm_head may be absent."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # older checkpoints store this derived buffer
            continue
        if name not in params:
            raise ModelFormatError(f"{source}: unexpected tensor {name!r} for {model.config.architecture}")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ModelFormatError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(params[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(tensor)
    missing = [n for n in params if n not in tensors and not (tied and n == "lm_head.weight")]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelFormatError(f"{source}: missing tensors {missing[:3]}{more}")


class CheckpointSlice:
    """A tensor of a safetensors file not read yet: indexing it reads only those rows or columns from the file."""

    def __init__(self, st, name: str):
        self._slice = st.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())

    def __getitem__(self, index) -> torch.Tensor:
        return self._slice[index]


def read_safetensors(folder: Path, prepare: TensorMap | None = None, sliced: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, each passed through `prepare` as it is read ({name: tensor}
    in, what to keep out): renamed, split, or cut to a tensor-parallel rank's slice before the next one is read.
    sliced: `prepare` gets CheckpointSlices and reads what it keeps (a rank's rows or columns) itself."""
    files = safetensors_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    one = {name: CheckpointSlice(st, name) if sliced else st.get_tensor(name)}
                    tensors.update(one if prepare is None else prepare(one))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFormatError(f"{f}: unreadable safetensors file ({e})") from e
    return tensors


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's files: those its index (model.safetensors.index.json) maps tensors to, when it has one (a
    repository may ship other weights beside them, such as Mistral's consolidated.safetensors); else every one."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(f"{folder}: no *.safetensors weight files")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ModelFormatError(f"{index}: not a safetensors index (a JSON object with a weight_map): {e!r}") from e
    if missing := [f.name for f in files if not f.is_file()]:
        raise ModelFormatError(f"{index} maps tensors to {missing[0]}, which is not in the folder")
    if not files:
        raise ModelFormatError(f"{index}: its weight_map names no file")
    return files


def find_llama2c(path: Path) -> tuple[Path, Path] | None:
    """(checkpoint.bin, tokenizer.bin) when `path` is a llama2.c checkpoint or a folder holding one."""
    if path.is_file() and path.suffix == ".bin":
        ckpt, folder = path, path.parent
    elif path.is_dir() and not (path / "config.json").exists():
        bins = [p for p in path.glob("*.bin") if not p.name.startswith("tok")]
        if len(bins) != 1:
            return None
        ckpt, folder = bins[0], path
    else:
        return None
    toks = sorted(folder.glob("tok*.bin"))
    if not toks:
        raise ModelFormatError(f"{ckpt}: a llama2.c checkpoint needs its tokenizer (tok*.bin) beside it")
    return ckpt, toks[0]


QUANTIZATIONS = ("int8", "int4", *(f"int4-g{g}" for g in INT4_GROUP_SIZES))


def parse_quantization(quantization: str | None) -> tuple[str | None, int]:
    """'int8' -> ('int8', 32); 'int4' -> ('int4', 32); 'int4-g128' -> ('int4', 128); None -> (None, 32)."""
    if quantization is None:
        return None, 32
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}, got {quantization!r}")
    scheme, _, group = quantization.partition("-g")
    return scheme, int(group or 32)


def model_path(model: str | os.PathLike) -> Path:
    """The file or folder a model argument names (a short name, a folder, a checkpoint), or a clear error."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or a short name such as 'default', got {model!r}")
    path = SHORT_NAMES.get(str(model), Path(model))
    if not path.exists() and HUB_ID.fullmatch(str(model)):
        return hub_snapshot(str(model))
    if not path.exists():
        hint = " (short names: " + ", ".join(SHORT_NAMES) + "; or a Hugging Face hub id, org/name)"
        raise FileNotFoundError(f"model {str(model)!r} not found: no such file or folder{hint}")
    return path


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name, and no such path here
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]  # what loading reads (not .bin, .pt)


def hub_snapshot(repo_id: str) -> Path:
    """A Hugging Face hub model, as vLLM takes one: downloaded once into the hub's own cache (only what loading
    reads), then read from there, also offline. Not in tests: they build their models or read ../shared."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline and not cached, no such repository, a gated one without a token, ...
        raise FileNotFoundError(
            f"model {repo_id!r} is no file or folder here, and the Hugging Face hub did not give it: "
            f"{type(e).__name__}: {' '.join(str(e).split())}"
        ) from None


def check_splits(model: str | os.PathLike, size: int) -> None:
    """Refuse, before any tensor-parallel worker starts, a model that is not there or cannot be split `size` ways
    (a Hugging Face folder's config says; a llama2.c checkpoint is checked as it loads)."""
    path = model_path(model)
    if path.is_dir() and find_llama2c(path) is None:
        shard_config(ModelConfig.from_folder(path), size)


def load_model(
    model: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    fuse_projections: bool = False,
    quantization: str | None = None,
    quantize_lm_head: bool = True,
    tensor_parallel: Collectives | None = None,
) -> LoadedModel:
    """Load a model by short name ('default'), Hugging Face folder, or llama2.c checkpoint.

    fuse_projections (chapter 6) concatenates each layer's q/k/v weights, and its gate/up weights, once loaded.
    quantization (chapter 7): 'int8' (per output channel), 'int4' (groups of 32 inputs), 'int4-g64', 'int4-g128'
    replaces the decoder's linear layers (and the output layer, if quantize_lm_head) by quantized ones.
    tensor_parallel (a rank's process group) loads only that rank's shard, and puts the all-reduces in
    (models/sharding.py); `config` stays the whole model's.
    """
    scheme, group_size = parse_quantization(quantization)
    path = model_path(model)
    torch_dtype = resolve_dtype(dtype)
    check_device(device)
    rank, size = (tensor_parallel.rank, tensor_parallel.size) if tensor_parallel is not None else (0, 1)

    def prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = checkpoint_tensors(cfg, tensors)  # GPT-2's names and Conv1D layout, Phi-3's fused projections
        return {name: shard_tensor(name, t, cfg, rank, size) for name, t in tensors.items()}  # this rank's slice

    llama2c = find_llama2c(path)
    if llama2c is not None:
        hf_config, tensors = read_llama2c(llama2c[0])
        cfg = ModelConfig.from_dict(hf_config, source=str(llama2c[0]))
        tokenizer: Tokenizer = Llama2cTokenizer(llama2c[1], cfg.vocab_size)
        source, tensors = str(llama2c[0]), prepare(tensors)
    elif path.is_dir():
        cfg = ModelConfig.from_folder(path)
        shard_config(cfg, size)  # a model that cannot be split so is refused before any weight is read
        # a rank reads only its slices, unless the family's checkpoint must be renamed or split whole first
        tensors = read_safetensors(path, prepare, sliced=size > 1 and cfg.architecture not in CHECKPOINT_NAMES)
        tokenizer = HFTokenizer(path)
        source = str(path)
    else:
        raise ModelFormatError(f"{path}: neither a Hugging Face model folder nor a llama2.c .bin checkpoint")
    if cfg.eos_token_ids:
        tokenizer.eos_token_ids = cfg.eos_token_ids
    with torch.device("meta"):  # no memory and no random init for weights we overwrite anyway
        net = build_model(shard_config(cfg, size))  # the architecture's class (models/__init__.py), one rank's
    net.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor: tie them again
        net.lm_head.weight = net.model.embed_tokens.weight
    load_state_dict_into(net, tensors, source)
    if fuse_projections:
        fuse_projections_(net)
    net = net.to(torch_dtype).eval()
    # RoPE's frequencies stay float32 whatever the weights' dtype, as in transformers: rounded to bf16, each
    # angle position * inv_freq would drift further from the true one at every position
    if cfg.position_embedding == "rope":  # GPT-2 learns a table of positions instead
        net.inv_freq = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    if scheme is not None:
        tp_scales = row_max(tensor_parallel) if tensor_parallel is not None else None
        quantize_model_(net, scheme, group_size, lm_head=quantize_lm_head, row_max=tp_scales)
    net.transpose_weights_()
    if tensor_parallel is not None:
        parallelize_(net, tensor_parallel, cfg.vocab_size)
    return LoadedModel(net, cfg, tokenizer, path)
