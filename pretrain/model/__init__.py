"""The model: tokenizer, config and weights from the Hub or a folder, the speed-ups applied to the built model, and
the output projection and loss a chunk of tokens at a time.

It may import the base and data. It must not prepare the model for a launch (that is the loop's, through
distributed) nor touch an optimizer.

Modules:
loading       tokenizer, config and weights from the Hub or a folder (the demo's from data.demo_corpus)
speedups      regional torch.compile and Liger-Kernel, applied to the built model
chunked_loss  the output projection and cross-entropy a chunk of tokens at a time; a micro-batch's losses
"""
