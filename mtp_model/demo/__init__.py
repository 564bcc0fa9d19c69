"""The project's own demo model: corpus, tokenizer, base model and adapter builders."""
