"""VideoChat-Flash, own implementation (vision encoder, HiCo, Qwen2 LLM with dropping).

Kept import-free so ``import model.errors`` stays cheap for the other packages. Entry points:

- ``model.loader.load_model(settings) -> LoadedModel`` (model, tokenizer, fingerprint, …)
- ``model.videochat_flash.VideoChatFlash``: ``encode_clips``, ``encode_image``, ``splice``, ``llm``
- ``model.preprocess.preprocess_frames(frames, size)``
- ``model.generation.GenerationSession`` / ``generate``; ``model.prompt`` for prompts
- ``model.tiny.build_tiny(seed)``: the built-in tiny model
"""
