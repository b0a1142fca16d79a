"""GPT-2 in Hugging Face's layout: read a transformers model folder, fetch one from the Hub, write one.

A folder in that layout holds config.json (the shape and the options of the model), model.safetensors (the
weights), vocab.json and merges.txt (the tokenizer: the same tables as the release's encoder.json and vocab.bpe).
The tensors map one to one onto the release's: `h.3.attn.c_attn.weight` is `h3/attn/c_attn/w`, and HF's Conv1D
keeps its weights as [in, out], the release's orientation, so nothing is transposed. Reading needs neither torch
nor TensorFlow: the safetensors package reads the file into NumPy arrays.

utils.py calls in here for any folder that holds a config.json and no TensorFlow checkpoint; export.py writes
through `save_hf_model`.
"""
import functools
import json
import os
import re
import struct
import zipfile

import numpy as np

import utils
from encoder import tokenizer_files

CONFIG, WEIGHTS, VOCAB, MERGES = "config.json", "model.safetensors", "vocab.json", "merges.txt"
SHARD_INDEX = "model.safetensors.index.json"  # a model saved in several files names each tensor's file here
TORCH_WEIGHTS = "pytorch_model.bin"  # older folders: PyTorch's pickle format
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = (CONFIG, VOCAB, MERGES)
SAFETENSORS_FILES = (WEIGHTS, SHARD_INDEX, "model-*-of-*.safetensors")
TORCH_FILES = (TORCH_WEIGHTS, "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")
ENDOFTEXT = 50256

# What the forward pass in gpt2.py computes, as the config options that select it, with the value transformers
# assumes when the option is absent. A config that asks for anything else is refused: loading it would give
# wrong logits without a word.
IMPLEMENTED = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
               "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
               "add_cross_attention": False}
SHAPE_KEYS = ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size")
HPARAM_NAMES = {"vocab_size": "n_vocab", "n_positions": "n_ctx"}  # the others have hparams.json's names
# Buffers that old transformers saved with the weights: the causal mask, rebuilt by every forward pass.
IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}  # bfloat16 has no NumPy dtype: widened by hand


def is_hf_folder(model_dir):
    """A folder in HF's layout: a config.json and no TensorFlow `checkpoint` (which wins when both are there)."""
    return os.path.isfile(os.path.join(model_dir, CONFIG)) and not os.path.isfile(os.path.join(model_dir, "checkpoint"))


def label(model_dir):
    """How messages name a folder: a Hub snapshot by its repo id, anything else by its path."""
    return _hub_repos.get(model_dir, (model_dir,))[0]


# --- Names -----------------------------------------------------------------------------------------------------

def hf_name(name):
    """Our flat name -> HF's: "h3/attn/c_attn/w" -> "h.3.attn.c_attn.weight", "wte" -> "wte.weight"."""
    *path, leaf = name.split("/")
    if not path:  # wte, wpe: an embedding's matrix is its weight
        return f"{leaf}.weight"
    path = [f"h.{p[1:]}" if re.fullmatch(r"h\d+", p) else p for p in path]
    return ".".join([*path, {"g": "weight", "w": "weight", "b": "bias"}[leaf]])


def expected_shapes(hparams):
    """{our flat name: shape} for a model of these hparams, the linear weights as [in, out]."""
    n_embd = hparams["n_embd"]
    shapes = {"wte": (hparams["n_vocab"], n_embd), "wpe": (hparams["n_ctx"], n_embd), "ln_f/g": (n_embd,),
              "ln_f/b": (n_embd,)}
    block = {"ln_1/g": (n_embd,), "ln_1/b": (n_embd,), "ln_2/g": (n_embd,), "ln_2/b": (n_embd,),
             "attn/c_attn/w": (n_embd, 3 * n_embd), "attn/c_attn/b": (3 * n_embd,),
             "attn/c_proj/w": (n_embd, n_embd), "attn/c_proj/b": (n_embd,),
             "mlp/c_fc/w": (n_embd, 4 * n_embd), "mlp/c_fc/b": (4 * n_embd,),
             "mlp/c_proj/w": (4 * n_embd, n_embd), "mlp/c_proj/b": (n_embd,)}
    for i in range(hparams["n_layer"]):
        shapes.update({f"h{i}/{name}": shape for name, shape in block.items()})
    return shapes


# --- config.json -------------------------------------------------------------------------------------------------

def read_config(model_dir):
    path = os.path.join(model_dir, CONFIG)
    try:
        config = utils.read_json(path)
    except ValueError as e:
        raise utils.ModelError(f"{label(model_dir)}: {CONFIG} is not valid JSON ({e})") from None
    except OSError as e:
        raise utils.ModelError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(config, dict):
        raise utils.ModelError(f"{label(model_dir)}: {CONFIG} is not a JSON object")
    return config


def check_config(model_dir):
    """The hparams of an HF folder's config.json, or ModelError naming the first option that the forward pass
    does not implement (another kind of model, another activation, another layer norm epsilon ...)."""
    config, name = read_config(model_dir), label(model_dir)
    if config.get("model_type") != "gpt2":
        raise utils.ModelError(f"{name} is not a GPT-2 model: its {CONFIG} has model_type "
                               f"{config.get('model_type')!r}, and only 'gpt2' loads here")
    bad = [key for key in SHAPE_KEYS if type(config.get(key)) is not int or config[key] < 1]
    if bad:
        raise utils.ModelError(f"{name}: {CONFIG} needs {', '.join(bad)} as whole numbers >= 1")
    for key in SHAPE_KEYS:  # hparams.json's bounds, before anything is counted from them (n_layer 10**30 hung)
        limit = utils.HPARAMS_LIMIT[HPARAM_NAMES.get(key, key)]
        if config[key] > limit:
            raise utils.ModelError(f"{name}: {CONFIG} has {key} {config[key]}, not a whole number from 1 to {limit}")
    for option, value in IMPLEMENTED.items():
        if config.get(option, value) != value:
            raise utils.ModelError(f"{name}: {CONFIG} sets {option} to {config[option]!r}; the forward pass here "
                                   f"implements only {value!r}")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise utils.ModelError(f"{name}: {CONFIG} sets n_inner to {config['n_inner']!r}; the forward pass here "
                               f"implements only 4 * n_embd = {4 * config['n_embd']}")
    if config["n_embd"] % config["n_head"]:
        raise utils.ModelError(f"{name}: {CONFIG} has n_embd {config['n_embd']}, not divisible by n_head "
                               f"{config['n_head']}")
    return {"n_vocab": config["vocab_size"], "n_ctx": config["n_positions"], "n_embd": config["n_embd"],
            "n_head": config["n_head"], "n_layer": config["n_layer"]}


def tied(model_dir):
    return read_config(model_dir).get("tie_word_embeddings", True)


# --- vocab.json and merges.txt ------------------------------------------------------------------------------------

def check_tokenizer(model_dir, n_vocab):
    """ModelError naming the tokenizer file that is missing or cannot be GPT-2's BPE tables: vocab.json and
    merges.txt get the release's checks of encoder.json and vocab.bpe, whose contents they are. A folder that also
    holds an encoder.json is tokenized by it and vocab.bpe (encoder.tokenizer_files): those two are checked."""
    name, (vocab, merges) = label(model_dir), tokenizer_files(model_dir)
    problems = utils.folder_problems(model_dir, (vocab, merges))
    if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        problems = {file: f"{problem} (a tokenizer.json alone is not read here)" if problem == "missing" else problem
                    for file, problem in problems.items()}
    utils.report_problems(name, problems)
    problem = utils.merges_problem(model_dir, vocab, merges)
    if problem:
        raise utils.ModelError(f"model folder {name} cannot be loaded: {problem}")
    if n_vocab < utils.N_VOCAB:
        raise utils.ModelError(f"{name}: {vocab} holds {utils.N_VOCAB} tokens, more than the model's vocab_size "
                               f"{n_vocab}: it does not belong to this model")


# --- The weights ---------------------------------------------------------------------------------------------------

def weight_files(model_dir):
    """The files that hold the weights: model.safetensors, the shards its index names, or pytorch_model.bin."""
    if os.path.isfile(os.path.join(model_dir, WEIGHTS)):
        return [os.path.join(model_dir, WEIGHTS)]
    for index in (SHARD_INDEX, TORCH_FILES[1]):
        path = os.path.join(model_dir, index)
        if os.path.isfile(path):
            try:
                shards = sorted(set(utils.read_json(path)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise utils.ModelError(f"{label(model_dir)}: {index} has no weight_map") from None
            return [os.path.join(model_dir, shard) for shard in shards]
    if os.path.isfile(os.path.join(model_dir, TORCH_WEIGHTS)):
        return [os.path.join(model_dir, TORCH_WEIGHTS)]
    raise utils.ModelError(f"{label(model_dir)} has no {WEIGHTS} (nor {TORCH_WEIGHTS})")


def safetensors_header(path):
    """{tensor name: (dtype, shape)} from a safetensors file's header, without reading any data."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format", "pt") not in ("pt", "np", "numpy", "tf", "flax", "mlx"):
                raise utils.ModelError(f"{path}: unknown safetensors format {metadata['format']!r}")
            return {key: (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape())) for key in f.keys()}
    except utils.ModelError:
        raise
    except Exception as e:  # safetensors' own SafetensorError for a damaged or cut-short file
        raise utils.ModelError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


@functools.lru_cache(maxsize=1)  # checked, then read: one unpickling of a file that may be gigabytes
def torch_state(path):
    """PyTorch's pickle format, read only as plain tensors (weights_only: a pickle can run code otherwise)."""
    try:
        import torch
    except ImportError:
        folder = os.path.dirname(path)
        raise utils.ModelError(
            f"{path} is in PyTorch's format, which needs torch to read; convert it once where transformers is "
            f"installed: python -c \"from transformers import GPT2LMHeadModel as M; "
            f"M.from_pretrained('{folder}').save_pretrained('{folder}')\" (writes {WEIGHTS})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error, a file cut short, a pickle that is more than tensors
        if cut_short(path):  # torch says "[Errno 22] Invalid argument" of most cuts
            raise utils.ModelError(f"{path} is truncated or damaged: it stops before the end of its zip archive (a "
                                   f"download or a copy cut short?); fetch or copy it again") from None
        raise utils.ModelError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def cut_short(path):
    """Whether a PyTorch file is empty or a zip archive (its format since torch 1.6) without its end: the central
    directory, written last."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            return head == b"" or (head == b"PK\x03\x04" and not zipfile.is_zipfile(f))
    except OSError:
        return False


def tensor_index(model_dir):
    """{HF tensor name: (file, dtype, shape)} over all of the folder's weight files."""
    index = {}
    for path in weight_files(model_dir):
        if not os.path.isfile(path):
            raise utils.ModelError(f"{label(model_dir)} has no {os.path.basename(path)}")
        if path.endswith(".bin"):
            index.update({key: (path, str(t.dtype), tuple(t.shape)) for key, t in torch_state(path).items()})
        else:
            index.update({key: (path, dtype, shape) for key, (dtype, shape) in safetensors_header(path).items()})
    return index


def check_weights(model_dir, hparams):
    """{our flat name: HF tensor name}, after checking every tensor's shape and dtype against config.json from
    the safetensors header alone (no data read): ModelError naming the first tensor that does not fit."""
    name, index = label(model_dir), tensor_index(model_dir)
    prefix = "transformer." if any(key.startswith("transformer.") for key in index) else ""  # GPT2LMHeadModel's
    names = {}
    for ours, shape in expected_shapes(hparams).items():
        key = prefix + hf_name(ours)
        if key not in index:
            raise utils.ModelError(f"{name} has no tensor {key}")
        _, dtype, found = index[key]
        if found != shape:
            raise utils.ModelError(f"{name}: tensor {key} has shape {list(found)}, but {CONFIG} makes it "
                                   f"{list(shape)}")
        if dtype not in DTYPES and dtype not in ("torch.float32", "torch.float16", "torch.bfloat16"):
            raise utils.ModelError(f"{name}: tensor {key} is {dtype}; only float32, float16 and bfloat16 load")
        names[ours] = key
    known = set(names.values()) | {"lm_head.weight"}
    for key in index:
        if key not in known and not IGNORED.fullmatch(key.removeprefix(prefix)):
            raise utils.ModelError(f"{name}: unexpected tensor {key}: not GPT-2's language model")
    if "lm_head.weight" in index and index["lm_head.weight"][2] != expected_shapes(hparams)["wte"]:
        raise utils.ModelError(f"{name}: tensor lm_head.weight has shape {list(index['lm_head.weight'][2])}, "
                               f"not wte's")
    if not tied(model_dir) and "lm_head.weight" not in index:
        raise utils.ModelError(f"{name}: {CONFIG} sets tie_word_embeddings to false but there is no "
                               f"lm_head.weight; the forward pass here uses wte as the head")
    return names


def bfloat16_tensor(path, key):
    """A bfloat16 tensor of a safetensors file, widened exactly to float32: its 16 bits are the top half of the
    float32 with the same value. The header (a little-endian length, then JSON) gives where its bytes are."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(length))[key]
    start, end = entry["data_offsets"]
    bits = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=8 + length + start)
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def read_tensors(model_dir, names):
    """{our flat name: float32 array} for the HF names in `names` (see check_weights)."""
    from safetensors import safe_open

    by_file, index = {}, tensor_index(model_dir)
    for ours, key in names.items():
        by_file.setdefault(index[key][0], []).append((ours, key))
    if "lm_head.weight" in index:
        by_file.setdefault(index["lm_head.weight"][0], []).append(("lm_head", "lm_head.weight"))
    flat = {}
    for path, wanted in by_file.items():
        if path.endswith(".bin"):
            state = torch_state(path)
            flat.update({ours: state[key].float().numpy() for ours, key in wanted})
            continue
        with safe_open(path, framework="np") as f:
            for ours, key in wanted:
                if index[key][1] == "BF16":
                    flat[ours] = bfloat16_tensor(path, key)
                else:
                    flat[ours] = f.get_tensor(key).astype(np.float32, copy=False)
    for ours, key in [*names.items(), ("lm_head", "lm_head.weight")]:  # before lm_head is compared with wte
        if ours in flat:
            utils.refuse_nonfinite(label(model_dir), key, flat[ours])
    return flat


def load_params(model_dir, hparams):
    """The flat {name: float32 array} of an HF folder, the linear weights laid out as read_tf_checkpoint lays
    them out (utils.decode_order), wte as the file has it (read on every run: utils.in_decode_order says why).
    lm_head.weight, when a file has one, must equal wte: the forward pass ties them."""
    flat = read_tensors(model_dir, check_weights(model_dir, hparams))
    head = flat.pop("lm_head", None)
    if head is not None and not np.array_equal(head, flat["wte"]):
        raise utils.ModelError(f"{label(model_dir)}: lm_head.weight differs from wte.weight (untied embeddings); "
                               f"the forward pass here uses wte as the head")
    return utils.in_decode_order(flat, time_head=False)


# --- The Hub --------------------------------------------------------------------------------------------------------

REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^@\s]+))?")
_hub_repos = {}  # snapshot folder -> (the name the user gave, repo id, commit), for this process
_snapshots = {}  # (repo, revision) -> snapshot folder, fetched once per process


def parse_repo_id(name):
    """(repo, revision or None) if name reads as a Hub repo id, owner/name[@revision], else None."""
    match = REPO_ID.fullmatch(name)
    if not match or "--" in match["repo"] or ".." in match["repo"] or match["repo"].endswith("."):
        return None
    return match["repo"], match["revision"]


def hub_download(repo, revision, patterns, name):
    """The snapshot folder of repo at revision in huggingface_hub's cache, holding the files matching patterns.
    huggingface_hub does the work (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, its cache, resumed downloads, locks);
    every way it fails becomes one line."""
    from huggingface_hub import constants, errors, snapshot_download

    where = constants.ENDPOINT
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=list(patterns))
    except errors.RepositoryNotFoundError:  # also private and gated repos: the Hub says 404 or 401 to both
        raise utils.ModelError(f"no model {repo} on {where} (if it is private or gated, set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise utils.ModelError(f"{repo} on {where} has no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError:  # no connection, or offline, and not (all) in the cache
        offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)()  # a function since 1.0
        reason = "HF_HUB_OFFLINE is set" if offline else f"{where} cannot be reached"
        raise utils.ModelError(f"{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}") \
            from None
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise utils.ModelError(f"{where} answered HTTP {status} for {repo}") from None
    except (OSError, ValueError) as e:  # a proxy error, a full disk, a folder we may not write
        raise utils.ModelError(f"could not fetch {name} from {where}: {str(e).splitlines()[0] if str(e) else e!r}") \
            from None
    except Exception as e:  # httpx's errors are not OSErrors
        if type(e).__module__.startswith(("httpx", "httpcore")):
            raise utils.ModelError(f"could not fetch {name} from {where}: {e}") from None
        raise


def hub_folder(name):
    """The local snapshot folder of a Hub repo id, holding config.json, vocab.json and merges.txt: the small
    files come first, so a repo that is not GPT-2 is refused before gigabytes of weights are fetched."""
    repo, revision = parse_repo_id(name)
    if (repo, revision) not in _snapshots:
        folder = hub_download(repo, revision, TOKENIZER_FILES, name)
        if not os.path.isfile(os.path.join(folder, CONFIG)):
            raise utils.ModelError(f"{name} has no {CONFIG}: not a transformers model")
        _snapshots[repo, revision] = folder
        _hub_repos[folder] = (name, repo, os.path.basename(folder))  # the folder is named by its commit
    return _snapshots[repo, revision]


def fetch_weights(model_dir):
    """A Hub snapshot's weights, at the commit its small files came from: model.safetensors (or its shards), or
    pytorch_model.bin where the repo has no safetensors and torch can read it. A local folder is left as it is."""
    if model_dir not in _hub_repos:
        return
    name, repo, commit = _hub_repos[model_dir]
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # "No files matched" when a repo has only pytorch_model.bin: we look next
    try:
        hub_download(repo, commit, SAFETENSORS_FILES, name)
        if not any(os.path.isfile(os.path.join(model_dir, f)) for f in (WEIGHTS, SHARD_INDEX)):
            try:
                import torch  # noqa: F401  (only then is pytorch_model.bin worth fetching)
            except ImportError:
                raise utils.ModelError(f"{name} has no {WEIGHTS}, and its {TORCH_WEIGHTS} needs torch to read "
                                       f"(pip install torch)") from None
            hub_download(repo, commit, TORCH_FILES, name)
    finally:
        hub_log.setLevel(level)


# --- Writing a model in HF's layout ---------------------------------------------------------------------------------

def to_bfloat16_bits(array):
    """float32 -> the bits of the nearest bfloat16 (ties to even), as uint16: the top half of each float32,
    rounded by what the bottom half held."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    return rounded.astype(np.uint16)


def check_float16_range(tensors):
    """ModelError naming the first tensor with a number float16 cannot hold (it would be written as inf)."""
    largest = float(np.finfo(np.float16).max)
    for key, array in tensors.items():
        peak = float(np.max(np.abs(array))) if array.size else 0.0
        if peak > largest:
            raise utils.ModelError(f"tensor {key} holds {peak:g}, past float16's largest number {largest:g} "
                                   f"(it would become inf): export with --dtype bfloat16 or float32")


def save_safetensors(path, tensors, dtype):
    """Write {HF name: float32 array} as a safetensors file of float32, float16 or bfloat16, with the metadata
    {"format": "pt"} that transformers asks of a file it loads. safetensors' NumPy API writes float32 and
    float16; bfloat16 is written as its uint16 bits, then the header is told they are BF16 (the bytes of a
    tensor are the same either way; only the header's dtype names differ)."""
    from safetensors.numpy import save_file

    if dtype != "bfloat16":
        save_file({k: np.ascontiguousarray(a, dtype=dtype) for k, a in tensors.items()}, path,
                  metadata={"format": "pt"})
        return
    save_file({k: to_bfloat16_bits(a) for k, a in tensors.items()}, path + ".u16", metadata={"format": "pt"})
    with open(path + ".u16", "rb") as src, open(path, "wb") as dst:
        (length,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(length))
        for key, entry in header.items():
            if key != "__metadata__":
                entry["dtype"] = "BF16"
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
        dst.write(struct.pack("<Q", len(text)) + text)
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    os.remove(path + ".u16")


def hf_config(hparams, dtype):
    """config.json for GPT2LMHeadModel: the shape, and every option at the value the forward pass here
    implements (the dropouts are GPT-2's training values, as in OpenAI's and HF's own configs). n_ctx repeats
    n_positions, as the Hub's GPT-2 configs do: llama.cpp's convert_hf_to_gguf.py reads it."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": hparams["n_vocab"],
            "n_positions": hparams["n_ctx"], "n_ctx": hparams["n_ctx"], "n_embd": hparams["n_embd"],
            "n_layer": hparams["n_layer"], "n_head": hparams["n_head"], "n_inner": None, **IMPLEMENTED,
            "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "initializer_range": 0.02,
            "bos_token_id": ENDOFTEXT, "eos_token_id": ENDOFTEXT, "tie_word_embeddings": True, "use_cache": True,
            "dtype": dtype}


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def tokenizer_source(model_dir, name):
    """The file of model_dir that plays the part of the release file `name` (encoder.json, vocab.bpe): itself,
    or HF's name for it (vocab.json, merges.txt), by the one rule load_encoder reads them by (tokenizer_files)."""
    vocab, merges = tokenizer_files(model_dir)
    return os.path.join(model_dir, {"encoder.json": vocab, "vocab.bpe": merges}[name])


def save_hf_model(model_dir, params, hparams, vocab_dir, dtype="float32"):
    """Write params (the tree gpt2.py unpacks) into model_dir in HF's layout, as GPT2LMHeadModel.save_pretrained
    would: the tensors under the prefix `transformer.`, no lm_head.weight (tied to wte), config.json,
    generation_config.json, and the tokenizer's vocab.json and merges.txt copied from vocab_dir. The caller picks
    a fresh model_dir, and fsyncs and renames it into place (see export.py)."""
    import shutil

    os.makedirs(model_dir, exist_ok=True)
    tensors = {f"transformer.{hf_name(name)}": array for name, array in utils.flatten(params).items()}
    if dtype == "float16":
        check_float16_range(tensors)
    save_safetensors(os.path.join(model_dir, WEIGHTS), tensors, dtype)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(os.path.join(model_dir, WEIGHTS), 0o666 & ~umask)  # safetensors creates it private, unlike the rest
    write_json(os.path.join(model_dir, CONFIG), hf_config(hparams, dtype))
    write_json(os.path.join(model_dir, GENERATION_CONFIG), {"bos_token_id": ENDOFTEXT, "eos_token_id": ENDOFTEXT})
    write_json(os.path.join(model_dir, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": hparams["n_ctx"], "add_prefix_space": False,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    shutil.copyfile(tokenizer_source(vocab_dir, "encoder.json"), os.path.join(model_dir, VOCAB))
    shutil.copyfile(tokenizer_source(vocab_dir, "vocab.bpe"), os.path.join(model_dir, MERGES))
