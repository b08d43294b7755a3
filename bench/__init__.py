"""Benchmark tools: a fake OpenAI-compatible backend, a load generator and the benchmark runner."""
