"""The GREEN judge: green-score's prompt and parser behind a cached loop, its engines (static, continuous batching, a
server) and the servers the project starts. Imports core."""
