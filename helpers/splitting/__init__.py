"""Task 1: the free-text findings split into lung / heart / mediastinal / bone / others (offline rules, OpenAI, a local
LLM), and the split's checks. Imports core."""
