"""The vision-language model: loading it with its processor and visual tokens, its prompts, batched generation with
per-region confidence, attention maps. Imports core."""
