"""The data: corpus files and their formats, the streamed, crash-safe build of the packed-token cache, the cache's key
and loading, mixtures of several corpora, document masks in packed blocks, and the demo's corpus and tokenizer.

It may import the base only. It must not build a model or an Accelerator, nor start a collective: processes share a
build through files (cache_claims), never through a process group.

Modules:
corpus_files  corpus formats, pieces of files, bad-input lines
hub_datasets  --dataset_name: a Hub or local dataset resolved to its data files
cache_claims  sharing a build folder between processes with claims and error files
corpus_build  the streamed, multi-process build of the data cache (`python -m pretrain.data.corpus_build`: its workers)
corpus_cache  the data cache's key and its memory-mapped loading
demo_corpus   the built-in demo's generated corpus and tokenizer
mixture       --train_mixture: the blend of several cached corpora, its positions and its resume
document_mask  positions restarting at each document, boundary labels, the check that a model honours them
"""
