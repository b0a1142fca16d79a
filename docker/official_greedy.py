"""Print OpenAI's own greedy continuation of a prompt: the openai/gpt-2 model and sampler with top_k=1.

Runs inside the `official` Docker stage (TensorFlow 1.x, openai/gpt-2's src/ on PYTHONPATH, the model named
by $MODEL under ./models), without the interactive prompt, so its output can be diffed with `python gpt2.py`.

    python3 official_greedy.py PROMPT [N_TOKENS]
"""
import json
import os
import sys

import tensorflow as tf

import encoder  # these three are openai/gpt-2's src/ modules
import model
import sample


def continuation(prompt, n_tokens, model_name, models_dir="models"):
    enc = encoder.get_encoder(model_name, models_dir)
    hparams = model.default_hparams()
    with open(os.path.join(models_dir, model_name, "hparams.json")) as f:
        hparams.override_from_dict(json.load(f))
    ids = enc.encode(prompt) or [enc.encoder["<|endoftext|>"]]  # an empty prompt starts a new document
    with tf.Session(graph=tf.Graph()) as sess:
        context = tf.placeholder(tf.int32, [1, None])
        tokens = sample.sample_sequence(hparams=hparams, length=n_tokens, context=context, batch_size=1,
                                        temperature=1, top_k=1)  # top_k=1: always the most likely token
        tf.train.Saver().restore(sess, tf.train.latest_checkpoint(os.path.join(models_dir, model_name)))
        out = sess.run(tokens, feed_dict={context: [ids]})
    return enc.decode(out[0, len(ids):])


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: official_greedy.py PROMPT [N_TOKENS]")
    n_tokens = int(sys.argv[2]) if len(sys.argv) == 3 else 40
    print(continuation(sys.argv[1], n_tokens, os.environ.get("MODEL", "124M")))
