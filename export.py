"""Write any model that loads here into another folder: Hugging Face's layout, or OpenAI's release layout.

    python export.py --model_size NAME --out DIR [--format hf|release] [--dtype float32|float16|bfloat16]
                     [--models_dir DIR] [--overwrite]

HF's layout is what transformers, accelerate and DeepSpeed, vLLM and llama.cpp's convert_hf_to_gguf.py read, so
a model fine-tuned here can go on from there. The release layout without a run's optimizer state is a model to
hand to someone (train.py's run folder also holds AdamW's moments, twice the model's size).
"""
import startup  # noqa: F401 -- first of all: a Ctrl-C during the slow imports below is one line, not a traceback
import fnmatch
import glob
import os
import shutil

import hf
import runs
import utils
from cli import check, run_script

FORMATS = ("hf", "release")
DTYPES = ("float32", "float16", "bfloat16")


def is_model_folder(folder):
    """A model as export writes one: the release layout (hparams.json and a checkpoint) or HF's (config.json and
    model.safetensors or pytorch_model.bin)."""
    def has(name):
        return os.path.isfile(os.path.join(folder, name))

    if utils.is_hf_layout(folder):
        return has(hf.WEIGHTS) or has(hf.TORCH_WEIGHTS)
    return has("hparams.json") and has("checkpoint")


def enclosing_model(path):
    """The outermost model folder or training run's saves folder that path lies in, symbolic links followed, or
    None: either is replaced whole (a run's saves at its next save), taking anything written inside with it."""
    folder, found = os.path.realpath(path), None
    while os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
        if is_model_folder(folder) or runs.saves_run(folder):
            found = folder
    return found


def check_out(out, overwrite):
    """The folder to write, before any work: refused if it is a file or a training run's name, if it lies inside a
    model (which would delete it), and if it exists, unless --overwrite and it is a model or empty."""
    check(isinstance(out, str) and out, f"--out must be a folder to write, got {out!r}")
    check(not os.path.isfile(out), f"--out {out} is a file; give a folder to write")
    check(not os.path.exists(out) or os.path.isdir(out), f"--out {out} is not a folder; give a folder to write")
    above = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(above):  # the folders to make: the first that exists must be one (/dev/full/x)
        above = os.path.dirname(above)
    check(os.path.isdir(above), f"--out {out} cannot be made: {above} is not a folder")
    run = runs.run_of(out)
    check(run is None, f"--out {out} belongs to the training run {run}: train.py --out_name {run} --overwrite "
                       f"starts the run again, or delete the run to free the name")
    inside = enclosing_model(out)
    if inside:
        run = runs.saves_run(inside)
        where = (f"the training run {run}'s folder {inside}: its next save would delete it" if run else
                 f"the model folder {inside}, which is replaced whole when it is saved again")
        raise utils.UsageError(f"--out {out} lies inside {where}; write it somewhere else")
    check(overwrite or not os.path.exists(out), f"--out {out} already exists: --overwrite replaces it")
    if os.path.isdir(out):
        def listing(names):
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        try:
            held = sorted(os.listdir(out))
        except OSError as e:  # a folder this user may not read (chmod 000)
            raise utils.ModelError(f"cannot read --out {out} ({e.strerror}), so --overwrite cannot tell what it "
                                   f"would delete") from None
        check(is_model_folder(out) or not held,
              f"--out {out} is not a model folder (it holds {listing(held)}): --overwrite replaces only a model")
        others = [name for name in held if not any(fnmatch.fnmatch(name, kind) for kind in MODEL_FILES)]
        check(not others, f"--out {out} holds more than a model ({listing(others)}): --overwrite would delete it "
                          f"with the model; move it out first")


# What a model folder holds, as export, train.py, gpt2.py (numpy-params) and HF's save_pretrained write them: all
# that --overwrite may delete with the folder.
MODEL_FILES = ("hparams.json", "checkpoint", "model.ckpt*", "encoder.json", "vocab.bpe", "numpy-params",
               *hf.TOKENIZER_FILES, *hf.SAFETENSORS_FILES, *hf.TORCH_FILES, hf.GENERATION_CONFIG, "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", ".*.lock")


def check_source(out, model_dir):
    source, target = os.path.realpath(model_dir), os.path.realpath(out)
    check(source != target and not source.startswith(target + os.sep),
          f"--out {out} holds the model being exported: write it somewhere else")


def fsync_tree(folder):
    """Every file written into folder (TensorFlow's and safetensors' writers do not fsync), then the folder."""
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        with open(path, "rb+") as f:
            utils.fsync_file(f)
    utils.fsync_dir(folder)


def write_folder(out, write, overwrite):
    """Run write(tmp_dir), then put tmp_dir in place of out. Until the rename a crash leaves out as it was; an
    old out is renamed aside first and deleted only once the new one is in place, so the one copy of a model is
    never deleted (a crash between the two renames leaves the old one as .<name>.old<pid> beside out)."""
    target = os.path.realpath(out)  # through the user's own symbolic link: the folder it points at is replaced
    parent, name = os.path.split(target)  # and the link stays (renaming the link aside left it behind)
    tmp_dir = os.path.join(parent, f".{name}.tmp{os.getpid()}")
    old_dir = os.path.join(parent, f".{name}.old{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        with utils.exclusive(target), utils.terminate_as_exit():
            check(overwrite or not os.path.exists(out), f"--out {out} already exists: --overwrite replaces it")
            for leftover in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.tmp*")):
                shutil.rmtree(leftover, ignore_errors=True)  # from an export that was killed: we hold the lock
            try:
                write(tmp_dir)
                fsync_tree(tmp_dir)
                if os.path.exists(target):
                    os.rename(target, old_dir)  # a folder cannot replace a non-empty one in one rename
                os.rename(tmp_dir, target)
                utils.fsync_dir(parent)
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            shutil.rmtree(old_dir, ignore_errors=True)
    except Exception as e:  # a read-only or full disk, as the system, TensorFlow or safetensors says it
        if runs.write_error(e) is None:
            raise
        raise utils.ModelError(f"could not write {out}: {runs.write_error(e)}") from None


def main(model_size, out, format="hf", dtype="float32", models_dir="models", overwrite=False):
    """Write a model (a release size, a model folder, a path, a Hub repo id) to --out in Hugging Face's layout or
    OpenAI's release layout.

    Args:
        model_size: the model: 124M, 355M, 774M or 1558M (downloaded if missing), a model folder under models_dir,
            a path to a model folder (./x), or a Hugging Face Hub repo id (owner/name[@revision])
        out: the folder to write; an existing one is refused unless --overwrite; never inside a model folder or a
            training run's, nor a training run's name or its -best
        format: hf (config.json, model.safetensors, vocab.json, merges.txt, generation_config.json), or release
            (OpenAI's TensorFlow checkpoint, hparams.json, encoder.json, vocab.bpe; no optimizer state)
        dtype: the weights' type in model.safetensors: float32, float16 or bfloat16 (release: float32 only)
        models_dir: where model folders live
        overwrite: replace --out if it is a model or empty (the old folder is deleted only once the new one is in
            place)
    """
    check(format in FORMATS, f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    check(dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check(format == "hf" or dtype == "float32", f"--format release holds float32 weights only, got --dtype {dtype}")
    check(isinstance(overwrite, bool), f"--overwrite must be True or False, got {overwrite!r}")
    check_out(out, overwrite)
    model_dir = utils.prepare_model(model_size, models_dir)
    check_source(out, model_dir)
    hparams = utils.load_hparams(model_dir)
    hparams = {key: hparams[key] for key in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}
    params = utils.load_model_params(model_size, models_dir, hparams["n_layer"])
    if format == "hf":
        write_folder(out, lambda tmp: hf.save_hf_model(tmp, params, hparams, model_dir, dtype), overwrite)
    else:
        write_folder(out, lambda tmp: utils.save_release_model(tmp, params, hparams, model_dir), overwrite)
    layout = "Hugging Face's layout" if format == "hf" else "OpenAI's release layout"
    print(f"wrote {model_size} to {out} in {layout} ({dtype})")


def cli():
    run_script(main, text_flags={"model_size", "out", "format", "dtype", "models_dir"})


if __name__ == "__main__":
    cli()
