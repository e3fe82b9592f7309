"""Checkpoint formats as data: key tables (``keymap``) for the ViT (``vit``), the LLM families (``llm``)
and the whole InternVL (``vlm``). Nothing here reads files; ``vitp.model.weights`` applies the tables."""
