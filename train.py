"""Training GPT-2 in NumPy: the backward pass, then AdamW and the training loop.

The first half mirrors gpt2.py's forward pass one piece at a time: each `*_forward` returns its output and a
cache of what its gradient needs, and the `*_backward` beside it turns the gradient of the loss with respect to
that output into gradients for its inputs and weights. The second half uses those gradients to train.
"""

# ============================================================================================ the backward pass


# ============================================================================================ training
