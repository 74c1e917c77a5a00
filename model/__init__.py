"""VideoChat-Flash, own implementation (vision encoder, HiCo, Qwen2 LLM with dropping).

Kept import-free so ``import model.errors`` stays cheap for the other packages. Entry points:

- ``model.loader.load_model(settings) -> LoadedModel`` (model, tokenizer, fingerprint, …)
- ``model.videochat_flash.VideoChatFlash``: ``encode_clips``, ``encode_image``, ``splice``, ``llm``
- ``model.preprocess.preprocess_frames(frames, size)``
- ``model.generation.GenerationSession`` / ``generate`` / ``decode_batch``; ``model.prompt``
- ``model.kv.KVPool`` (pooled KV), ``model.prefill`` (chunked prefill, prefix reuse and its
  cache), ``model.detok.IncrementalDetokenizer``
- ``model.synthetic``: random-weight models of the real geometries (benchmarks, device checks)
- ``model.tiny.build_tiny(seed)``: the built-in tiny model
"""
