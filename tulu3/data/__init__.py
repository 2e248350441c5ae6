"""Data layer: tokenizers, the Tülu 3 chat template, examples, packing, datasets, sampling.

tokenizer.py      load_tokenizer (Llama 3 tiktoken / sentencepiece / HF dir), build_tiny_tiktoken
chat_template.py  the Tülu 3 template -> ids + per-token train mask
examples.py       rows -> SFTExample / DPOExample / RLVRPrompt; RowError for malformed rows
packing.py        collate_sft / collate_dpo micro-batches, document masks, THD cu_seqlens, planner
loading.py        JSONL / JSON / Parquet / saved HF datasets, mixtures
cache.py          tokenization cache (memory-mapped .npy, atomic writes, build-once lock)
dataset.py        build_dataset: source -> cached tokenized SFT / DPO / RLVR dataset
sampler.py        GlobalBatchSampler: seeded epochs, DP sharding, exact resume
synthetic.py      deterministic toy data for the demo and tests
"""
